"""Generator and discriminator: masking, padding, growth, and the exact fast paths."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from trainer.model import (
    Discriminator,
    Generator,
    ModelConfig,
    attention_bias,
    replace_param,
    trim_padding,
)

CFG = ModelConfig(n_items=16, max_len=12, d_model=16, n_heads=2, n_layers=2, dropout=0.2,
                  d_disc=8)


def _generator(n_items: int = 30, seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    gen = Generator(CFG)
    gen.grow(n_items)
    return gen


def _histories(n_items: int = 30) -> torch.Tensor:
    torch.manual_seed(1)
    h = torch.randint(1, n_items + 1, (6, CFG.max_len))  # (B, L)
    h[1, :7] = 0  # left-padded
    h[2] = 0  # empty
    h[3, :-1] = 0  # one item
    return h


def test_attention_bias_never_masks_the_diagonal() -> None:
    bias = attention_bias(_histories())  # (B, 1, L, L)
    assert (bias.diagonal(dim1=-2, dim2=-1) == 0).all()
    assert (bias[:, :, 0, 1:] < 0).all()  # causal: the first position sees only itself
    assert (bias[1, 0, -1, :7] < 0).all()  # padded keys are hidden from real queries


@pytest.mark.parametrize("train", [False, True])
def test_forward_has_no_nan_for_empty_and_left_padded_histories(train: bool) -> None:
    gen = _generator().train(train)
    scores = gen(_histories())  # (B, V+1)
    assert scores.shape == (6, 31)
    assert torch.isfinite(scores).all()
    F.cross_entropy(scores, torch.ones(6, dtype=torch.long)).backward()
    assert all(torch.isfinite(p.grad).all() for p in gen.parameters() if p.grad is not None)


def test_padding_column_is_never_the_top_item() -> None:
    gen = _generator().eval()
    with torch.no_grad():
        scores = gen(_histories())
    assert (scores.argmax(dim=1) != 0).all()
    assert (scores[:, 0] < scores[:, 1:].min(dim=1).values).all()


def test_last_hidden_equals_the_last_position_of_encode() -> None:
    gen = _generator().eval()
    h = _histories()
    with torch.no_grad():
        torch.testing.assert_close(gen.last_hidden(h), gen.encode(h)[:, -1])


def test_trim_padding_is_exact() -> None:
    gen = _generator().eval()
    h = _histories()[[1, 3]]  # every row has >= 7 leading pads
    trimmed = trim_padding(h)
    assert trimmed.shape[1] == CFG.max_len - 7
    with torch.no_grad():
        torch.testing.assert_close(gen(trimmed), gen(h))
    assert trim_padding(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 1)


@pytest.mark.parametrize("n_new", [3, 100])  # within capacity; beyond it (reallocation)
def test_grow_keeps_learned_rows_and_old_scores(n_new: int) -> None:
    gen = _generator().eval()
    h = _histories()
    with torch.no_grad():
        before_rows = gen.item_table().clone()
        before = gen(h)
    replaced = gen.grow(n_new)
    assert bool(replaced) == (30 + n_new > CFG.n_items * 2)
    with torch.no_grad():
        after = gen(h)
    assert after.shape == (6, 31 + n_new)
    torch.testing.assert_close(gen.item_table()[:31], before_rows)
    torch.testing.assert_close(after[:, :31], before)
    assert gen.item_table()[31:].abs().max() < 0.2  # new rows start small


def test_replace_param_carries_adam_state_over_a_reallocation() -> None:
    gen = _generator(n_items=CFG.n_items)
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2)
    F.cross_entropy(gen(_histories(CFG.n_items)), torch.ones(6, dtype=torch.long)).backward()
    opt.step()
    old_state = {k: v.clone() for k, v in opt.state[gen.items.emb.weight].items()}
    pairs = gen.grow(5)
    assert len(pairs) == 1
    replace_param(opt, *pairs[0])
    new = gen.items.emb.weight
    state = opt.state[new]
    assert state["exp_avg"].shape == new.shape
    torch.testing.assert_close(state["exp_avg"][: CFG.n_items + 1], old_state["exp_avg"])
    assert (state["exp_avg"][CFG.n_items + 1 :] == 0).all()
    assert any(p is new for p in opt.param_groups[0]["params"])
    opt.zero_grad()
    F.cross_entropy(gen(_histories(CFG.n_items + 5)), torch.ones(6, dtype=torch.long)).backward()
    opt.step()  # would fail on a shape mismatch


def test_discriminator_scores_pairs_and_grows() -> None:
    torch.manual_seed(0)
    disc = Discriminator(CFG)
    disc.grow(30)
    h = _histories()
    items = torch.randint(1, 31, (6, 4))
    logits = disc(h, items)  # (B, K)
    assert logits.shape == (6, 4) and torch.isfinite(logits).all()
    disc.grow(100)
    torch.testing.assert_close(disc(h, items), logits)


def test_config_rejects_inconsistent_shapes() -> None:
    with pytest.raises(AssertionError, match="divisible"):
        dataclasses.replace(CFG, d_model=15)
