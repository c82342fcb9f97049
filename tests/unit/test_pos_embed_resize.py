import pytest
import torch
from open_clip.model import resize_pos_embed as oc_resize_pos_embed

from trainer.models.convert import resize_pos_embed


class _Visual(torch.nn.Module):
    def __init__(self, grid):
        super().__init__()
        self.grid_size = (grid, grid)


class _Model(torch.nn.Module):
    def __init__(self, grid):
        super().__init__()
        self.visual = _Visual(grid)


@pytest.mark.parametrize("old, new", [(7, 14), (14, 24), (24, 14)])
def test_resize_pos_embed_equals_open_clip(old, new):
    g = torch.Generator().manual_seed(old * 100 + new)
    pos = torch.randn(old * old + 1, 32, generator=g)
    sd = {"visual.positional_embedding": pos.clone()}
    oc_resize_pos_embed(sd, _Model(new))
    ours = resize_pos_embed(pos, new)
    assert ours.shape == (new * new + 1, 32)
    torch.testing.assert_close(ours, sd["visual.positional_embedding"], rtol=0, atol=1e-6)
    assert torch.equal(ours[0], pos[0])


def test_resize_pos_embed_same_grid_is_identity():
    pos = torch.randn(50, 8)
    assert resize_pos_embed(pos, 7) is pos
