"""Parts of training on their own: augmentation geometry, and BatchNorm over the global batch."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from resnet_edge.training.batches import affine_from_draws

SIZE = 28
PIXEL = 2 / SIZE  # one pixel in affine_grid's [-1, 1] coordinates


def _dots(*points: tuple[int, int]) -> torch.Tensor:
    """One 28x28 image per (row, col), black with that single pixel white: [len(points), 1, 28, 28]."""
    x = torch.zeros(len(points), 1, SIZE, SIZE)
    for i, (row, col) in enumerate(points):
        x[i, 0, row, col] = 1.0
    return x


def _centroids(x: torch.Tensor) -> torch.Tensor:
    """(row, col) of each image's centre of mass, in pixels: [N, 2]."""
    grid = torch.arange(SIZE, dtype=torch.float64)
    w = x[:, 0].double()
    mass = w.sum((1, 2))
    return torch.stack([(w.sum(2) * grid).sum(1) / mass, (w.sum(1) * grid).sum(1) / mass], 1)


def _draws(n: int, angle=0.5, scale=0.5, shift_x=0.5, shift_y=0.5) -> torch.Tensor:
    return torch.tensor([[angle, scale, shift_x, shift_y]], dtype=torch.float32).repeat(n, 1)


def test_draws_of_one_half_are_the_identity(small_mnist):
    x = torch.from_numpy(small_mnist.train_images[:16]).unsqueeze(1).float() / 255
    assert torch.allclose(affine_from_draws(x, _draws(16)), x, atol=1e-5)  # float rounding of the grid


@pytest.mark.parametrize("draw, moved", [(1.0, 2.8), (0.0, -2.8), (0.75, 1.4)])
def test_a_known_shift_moves_a_bright_pixel_by_that_many_pixels(draw, moved):
    """A draw of 1 is the largest shift, max_shift = 10 % of the image: 2.8 pixels. The sampling grid
    moves by +shift, so the picture moves the other way; x and y each by their own draw."""
    dot = _dots((14, 14))
    for axis, draws in ((1, _draws(1, shift_x=draw)), (0, _draws(1, shift_y=draw))):
        out = affine_from_draws(dot, draws)
        expected = torch.tensor([[14.0, 14.0]], dtype=torch.float64)
        expected[0, axis] -= moved
        assert torch.allclose(_centroids(out), expected, atol=1e-4), (axis, _centroids(out))
        assert math.isclose(out.sum().item(), 1.0, abs_tol=1e-5)  # the whole dot, split between two pixels


def test_rotation_and_scale_keep_their_bounds():
    """A draw of 1 rotates by 10 degrees and scales by 1.1 about the centre (13.5, 13.5 in pixels)."""
    centre = torch.tensor([13.5, 13.5], dtype=torch.float64)
    dot = _dots((13, 21))
    offset = _centroids(dot)[0] - centre
    for angle in (0.0, 1.0):
        moved = _centroids(affine_from_draws(dot, _draws(1, angle=angle)))[0] - centre
        turned = math.degrees(math.atan2(moved[0], moved[1]) - math.atan2(offset[0], offset[1]))
        assert abs(abs(turned) - 10) < 1.0 and abs(moved.norm() - offset.norm()) < 0.3, (turned, moved)
    grown = _centroids(affine_from_draws(dot, _draws(1, scale=1.0)))[0] - centre
    assert abs(grown.norm() / offset.norm() - 1.1) < 0.03 and abs(grown[0] - 1.1 * offset[0]) < 0.3


def test_no_draw_mirrors_a_digit():
    """A mirrored 2 is not a 2: at every corner of the draws' range (and random draws) three dots keep
    their orientation (the sign of the triangle's area), which a flip in x or y would reverse."""
    points = ((9, 10), (10, 18), (18, 12))
    dots = _dots(*points)

    def orientation(c: torch.Tensor) -> float:
        (y0, x0), (y1, x1), (y2, x2) = c.tolist()
        return (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)

    before = orientation(_centroids(dots))
    corners = [torch.tensor(c, dtype=torch.float32) for c in itertools.product((0.0, 1.0), repeat=4)]
    random = list(torch.rand(32, 4, generator=torch.Generator().manual_seed(0)))
    for d in corners + random:
        after = orientation(_centroids(affine_from_draws(dots, d.repeat(3, 1))))
        assert after * before > 0 and 0.7 < after / before < 1.35, (d, before, after)


# ------------------------------------------------------------------ GlobalBatchNorm2d against nn.BatchNorm2d
def _global_batchnorm_rank(rank: int, world_size: int, init_file: str) -> None:
    """One rank: its slice of each global batch through GlobalBatchNorm2d, against nn.BatchNorm2d on the
    whole batch (computed on every rank), for momentum 0.1 and None (the cumulative average)."""
    import torch.distributed as dist

    from resnet_edge.training.distributed import GlobalBatchNorm2d

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for momentum in (0.1, None):
            torch.manual_seed(0)  # the same batches and parameters on every rank
            ours, torchs = GlobalBatchNorm2d(3, momentum=momentum), nn.BatchNorm2d(3, momentum=momentum)
            for bn in (ours, torchs):
                with torch.no_grad():
                    bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
                    bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
            for step in range(4):
                x = torch.randn(4 * world_size, 3, 5, 5) * (step + 1) + step  # statistics that move
                probe = torch.randn_like(x)  # loss = sum(y * probe): every output counts differently
                x_all, x_mine = x.clone().requires_grad_(), x[4 * rank : 4 * (rank + 1)].clone().requires_grad_()
                y_all, y_mine = torchs(x_all), ours(x_mine)
                (y_all * probe).sum().backward()
                (y_mine * probe[4 * rank : 4 * (rank + 1)]).sum().backward()
                torch.testing.assert_close(y_mine, y_all[4 * rank : 4 * (rank + 1)], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(x_mine.grad, x_all.grad[4 * rank : 4 * (rank + 1)], rtol=1e-4, atol=1e-5)
            for name in ("weight", "bias"):  # a rank's gradient is its share; DDP sums them over the ranks
                grad = getattr(ours, name).grad.clone()
                dist.all_reduce(grad)
                torch.testing.assert_close(grad, getattr(torchs, name).grad, rtol=1e-4, atol=1e-5)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(getattr(ours, name), getattr(torchs, name), rtol=1e-5, atol=1e-6)
            ours.eval(), torchs.eval()
            x = torch.randn(2, 3, 5, 5) * 3 + 2
            torch.testing.assert_close(ours(x), torchs(x), rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_global_batchnorm_over_two_ranks_is_batchnorm_over_their_whole_batch(tmp_path):
    """Outputs, input and parameter gradients, running statistics (momentum 0.1 and None), eval mode."""
    import torch.multiprocessing as mp

    mp.spawn(_global_batchnorm_rank, args=(2, str(tmp_path / "rendezvous")), nprocs=2)


def test_global_batchnorm_outside_a_process_group_is_batchnorm():
    """One process without torch.distributed (the eval of a --sync-bn checkpoint, a single run)."""
    from resnet_edge.training.distributed import GlobalBatchNorm2d

    torch.manual_seed(0)
    for momentum in (0.1, None):
        ours, torchs = GlobalBatchNorm2d(3, momentum=momentum), nn.BatchNorm2d(3, momentum=momentum)
        for _ in range(3):
            x = torch.randn(4, 3, 5, 5) * 2 + 1
            torch.testing.assert_close(ours(x), torchs(x))
        torch.testing.assert_close(ours.state_dict(), torchs.state_dict())
