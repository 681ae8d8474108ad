"""Generator and discriminator: masking, padding, growth, and the exact fast paths."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from trainer.model import (
    NEG,
    Discriminator,
    Generator,
    LazyAdam,
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


# ---------------------------------------------------------------------------- output parts

HEAD_CFGS = [dataclasses.replace(CFG, item_bias=True),
             dataclasses.replace(CFG, tied_output=False),
             dataclasses.replace(CFG, item_bias=True, tied_output=False)]


def _head_generator(cfg: ModelConfig, n_items: int = 30) -> Generator:
    torch.manual_seed(0)
    gen = Generator(cfg)
    gen.grow(n_items)
    with torch.no_grad():  # trained-looking output parts, so that a lost row would show
        for table in gen.item_tables()[1:]:
            table.emb.weight[1 : n_items + 1].normal_(std=0.5)
    return gen


@pytest.mark.parametrize("cfg", HEAD_CFGS, ids=["bias", "untied", "bias+untied"])
def test_output_parts_score_every_item(cfg: ModelConfig) -> None:
    gen = _head_generator(cfg).eval()
    h = _histories()
    with torch.no_grad():
        hidden = gen.last_hidden(h)  # (B, D)
        scores = gen(h)  # (B, V+1)
        table = gen.item_table()  # (V+1, D)
        expected = hidden @ table.t()  # (B, V+1)
        if cfg.item_bias:
            expected = expected + gen.item_bias()
    assert table.shape == (31, CFG.d_model)
    if not cfg.tied_output:  # scoring rows are not the rows that embed the history
        assert not torch.equal(table, gen.items.emb.weight[:31])
    torch.testing.assert_close(scores[:, 1:], expected[:, 1:])
    assert (scores[:, 0] == NEG).all()  # padding is never recommended


def test_item_bias_starts_at_zero_and_shifts_scores() -> None:
    torch.manual_seed(0)
    gen = Generator(dataclasses.replace(CFG, item_bias=True)).eval()
    gen.grow(30)
    assert gen.item_bias() is not None and (gen.item_bias() == 0).all()  # (V+1,)
    h = _histories()
    with torch.no_grad():
        before = gen(h)
        gen.out_bias.emb.weight[5, 0] = 3.0
        after = gen(h)
    torch.testing.assert_close(after[:, 5], before[:, 5] + 3.0)
    torch.testing.assert_close(after[:, :5], before[:, :5])
    assert Generator(CFG).item_bias() is None and Generator(CFG).out_bias is None


@pytest.mark.parametrize("cfg", HEAD_CFGS, ids=["bias", "untied", "bias+untied"])
@pytest.mark.parametrize("n_new", [3, 100])  # within capacity; beyond it (reallocation)
def test_output_parts_grow_in_lock_step(cfg: ModelConfig, n_new: int) -> None:
    gen = _head_generator(cfg).eval()
    h = _histories()
    with torch.no_grad():
        before = gen(h)
    replaced = gen.grow(n_new)
    n_tables = len(gen.item_tables())
    assert n_tables == 1 + (not cfg.tied_output) + cfg.item_bias
    assert len(replaced) == (n_tables if 30 + n_new > CFG.n_items * 2 else 0)
    assert {t.capacity for t in gen.item_tables()} == {gen.items.capacity}
    with torch.no_grad():
        after = gen(h)
    assert after.shape == (6, 31 + n_new)
    torch.testing.assert_close(after[:, :31], before)
    if cfg.item_bias:
        assert (gen.item_bias()[31:] == 0).all()  # new items start with no offset
    if not cfg.tied_output:
        assert gen.item_table()[31:].abs().max() < 0.2  # new rows start small


@pytest.mark.parametrize("cfg", HEAD_CFGS, ids=["bias", "untied", "bias+untied"])
def test_output_parts_resize_and_reload(cfg: ModelConfig) -> None:
    gen = _head_generator(cfg, n_items=40).eval()
    torch.manual_seed(3)
    other = Generator(cfg).eval()
    other.resize(gen.items.capacity, gen.n_items)
    other.load_state_dict(gen.state_dict())
    h = _histories()
    with torch.no_grad():
        torch.testing.assert_close(other(h), gen(h))


def test_default_generator_has_a_tied_table_and_no_bias() -> None:
    gen = _generator()
    assert gen.out_items is None and gen.out_bias is None
    assert gen.item_tables() == [gen.items]
    assert gen.item_table().data_ptr() == gen.items.emb.weight.data_ptr()


def _table_and_optimizers(seed: int = 0) -> tuple[torch.nn.Embedding, torch.nn.Embedding]:
    torch.manual_seed(seed)
    dense = torch.nn.Embedding(50, 8, padding_idx=0)
    sparse = torch.nn.Embedding(50, 8, padding_idx=0, sparse=True)
    with torch.no_grad():
        sparse.weight.copy_(dense.weight)
    return dense, sparse


def test_lazy_adam_steps_dense_gradients_exactly_as_adam() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = torch.optim.Adam(a.parameters(), lr=1e-2), LazyAdam(b.parameters(), lr=1e-2)
    for step in range(5):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    opt_a.load_state_dict(opt_b.state_dict())  # the same state: a checkpoint loads either way


def test_lazy_adam_steps_only_the_rows_a_sparse_gradient_touches() -> None:
    dense, sparse = _table_and_optimizers()
    opt_d, opt_s = LazyAdam(dense.parameters(), lr=0.1), LazyAdam(sparse.parameters(), lr=0.1)
    ids = [torch.tensor([[3, 7, 7, 0]]), torch.tensor([[5, 9, 0, 0]])]
    for k, rows in enumerate(ids):
        for table, opt in ((dense, opt_d), (sparse, opt_s)):
            opt.zero_grad()
            (table(rows).sum(-1) * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
            opt.step()
        assert sparse.weight.grad is not None and sparse.weight.grad.is_sparse
        if k == 0:  # a first step moves the same rows by the same amounts as Adam
            assert torch.allclose(dense.weight, sparse.weight, atol=1e-6)
    # the second step: rows 3 and 7, untouched, stay where the first step left them (Adam's
    # momentum moves them on); rows 5 and 9 take Adam's first step
    moved = (dense.weight - sparse.weight).abs().sum(1) > 1e-6
    assert moved.nonzero().flatten().tolist() == [3, 7]
    assert torch.equal(sparse.weight[0], torch.zeros(8))  # padding never moves
    state = opt_s.state[sparse.weight]
    assert float(state["step"]) == 2 and state["exp_avg"][[1, 2, 4]].abs().sum() == 0
