"""Training examples/s per adversarial mode, as a ratio to `none` in the same run, and what
the fake-user detector and training filter add to the default mode.

Every mode trains on the same synthetic batches (same seed), one after the other in this
process, with the trainer's default model and replay settings. Then the default mode runs
again with the detector on (``ADVREC_TRAINER_DETECTOR=1``: every batch counted and its
users scored, a training round every 10 batches): its examples/s, the seconds of a round
and the scoring cost per example. Then with catalogue content (trainer/content.py): the text
encoder's load time and time per catalogue item, the trainer memory the content vectors and
the encoder take, the default mode's examples/s with every item's content known (the map
learning beside G) against without, and the disk the encoder's packages add to an install
(the image's growth). Writes bench/results/train.json and prints a table.

``--scale 1000000`` measures the default mode at a large catalogue instead (every item a live
row, as a shop's catalogue is): examples/s at 10,000 items and at the given size side by
side, with the shipped loss (``auto``: the full softmax at 10,000 items, the sampled one
above 100,000) and with the full softmax at the large size for reference, and the bytes of
the model and optimizer tables. Writes bench/results/train-scale.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advrec.contract import TrainingExample
from advrec.synthetic import SyntheticConfig, synthetic_events
from bench._common import machine, print_table, write_result
from trainer.adversarial import MODES, AdversarialConfig, uses_sampled
from trainer.content import ENCODER_PACKAGE, TextEncoder
from trainer.detector import DetectorConfig, TrainingFilter
from trainer.learner import OnlineLearner, TrainConfig
from trainer.model import ModelConfig
from trainer.settings import TrainerSettings


def batches(n: int, size: int, n_items: int, seed: int) -> list[list[TrainingExample]]:
    history: dict[str, list[str]] = {}
    out: list[TrainingExample] = []
    cfg = SyntheticConfig(n_users=2000, n_items=n_items, seed=seed)
    for e in synthetic_events(cfg, n * size):
        h = history.setdefault(e.user, [])
        out.append(TrainingExample(e.user, tuple(h[-50:]), e.item, e.ts))
        h.append(e.item)
    return [out[i:i + size] for i in range(0, len(out), size)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batches", type=int, default=40, help="timed batches per mode")
    p.add_argument("--warmup", type=int, default=10, help="untimed batches first")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--encode-items", type=int, default=2000,
                   help="catalogue texts timed through the encoder")
    p.add_argument("--scale", type=int, default=0, metavar="ITEMS",
                   help="measure training at a catalogue of ITEMS live items against 10,000 "
                        "(only that: bench/results/train-scale.json)")
    p.add_argument("--scale-full-batches", type=int, default=1,
                   help="--scale: timed batches of the full softmax at ITEMS, after one "
                        "warm-up batch (minutes each at 1M items; 0: skip it)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.scale:
        return scale(args)
    data = batches(args.warmup + args.batches, args.batch_size, args.items, seed=3)
    rows, result = [], {"settings": vars(args), "machine": machine(), "modes": {}}
    model_cfg = ModelConfig()
    adv_cfg = AdversarialConfig()
    result["model"] = dataclasses.asdict(model_cfg)
    result["adversarial"] = dataclasses.asdict(adv_cfg)
    for mode in MODES:
        learner = OnlineLearner(model_cfg, TrainConfig(mode=mode, seed=0), adv_cfg)
        for b in data[: args.warmup]:
            learner.train_batch(b)
        n = 0
        started = time.perf_counter()
        for b in data[args.warmup:]:
            n += int(learner.train_batch(b)["examples"])
        seconds = time.perf_counter() - started
        result["modes"][mode] = {"examples_per_s": n / seconds, "seconds": seconds,
                                 "examples": n}
    result["detector"] = detector_cost(data, args.warmup, model_cfg, adv_cfg)
    result["content"] = content_cost(data, args.warmup, model_cfg, adv_cfg, args.items,
                                     args.encode_items)
    base = result["modes"]["none"]["examples_per_s"]
    for mode, r in result["modes"].items():
        r["cost_vs_none"] = base / r["examples_per_s"]
        rows.append((mode, f"{r['examples_per_s']:8.0f} examples/s   cost {r['cost_vs_none']:.2f}x"
                           " none"))
    d = result["detector"]
    d["cost_vs_off"] = result["modes"][d["mode"]]["examples_per_s"] / d["examples_per_s"]
    rows.append((f"{d['mode']} + detector", f"{d['examples_per_s']:8.0f} examples/s   cost "
                 f"{d['cost_vs_off']:.2f}x {d['mode']}; a round {d['round_s']:.2f} s "
                 f"({d['rounds']} rounds), scoring {d['score_us_per_example']:.0f} us/example"))
    c = result["content"]
    c["cost_vs_off"] = result["modes"][c["mode"]]["examples_per_s"] / c["examples_per_s"]
    rows.append((f"{c['mode']} + content", f"{c['examples_per_s']:8.0f} examples/s   cost "
                 f"{c['cost_vs_off']:.2f}x {c['mode']}, {c['catalogue_items']} items with "
                 f"content ({c['content_mb']:.1f} MB)"))
    rows.append(("serving, 1 history", f"{c['serve_us_with_content']:.0f} us with the content "
                 f"score of {c['new_items']} new items vs {c['serve_us_without']:.0f} us without "
                 f"({c['serve_items']} items)"))
    rows.append(("text encoder", f"{c['encode_ms_per_item']:.2f} ms/item (batches of "
                 f"{c['encode_batch']}), load {c['encoder_load_s']:.1f} s, RSS +"
                 f"{c['encoder_rss_mb']:.0f} MB; packages +{c['install_mb']:.0f} MB on disk"))
    result["goal"] = "irgan cost <= 2x none"
    path = write_result("train", result)
    print_table(f"bench/train (batch {args.batch_size}, {args.items} items, "
                f"{args.threads} threads)", [*rows, ("results", str(path))])
    return 0


def scale(args: argparse.Namespace) -> int:
    """Training examples/s of the default mode at 10,000 items and at ``args.scale``."""
    from tqdm import tqdm

    mode = TrainerSettings.trainer_mode
    model_cfg = ModelConfig()
    runs = [("10k items", 10_000, "auto", args.warmup, args.batches),
            (f"{args.scale:,} items", args.scale, "auto", args.warmup, args.batches)]
    if args.scale_full_batches:  # the reference: what the sampled softmax saves
        runs.append((f"{args.scale:,} items, full softmax", args.scale, "full", 1,
                     args.scale_full_batches))
    result: dict = {"settings": vars(args), "machine": machine(), "mode": mode,
                    "model": dataclasses.asdict(model_cfg), "runs": {}}
    rows = []
    for label, n_items, loss, warmup, n_batches in runs:
        data = batches(warmup + n_batches, args.batch_size, n_items, seed=3)
        adv_cfg = AdversarialConfig(loss=loss)
        learner = OnlineLearner(model_cfg, TrainConfig(mode=mode, seed=0), adv_cfg)
        t0 = time.perf_counter()
        learner.add_items(f"i{k}" for k in range(n_items))  # the whole catalogue is live
        rows_s = time.perf_counter() - t0
        for b in tqdm(data[:warmup], desc=f"{label}: warm-up", leave=False):
            learner.train_batch(b)
        n = 0
        started = time.perf_counter()
        for b in tqdm(data[warmup:], desc=f"{label}: timed", leave=False):
            n += int(learner.train_batch(b)["examples"])
        seconds = time.perf_counter() - started
        tables = [*learner.generator.item_tables(), learner.discriminator.items]
        table_mb = sum(t.emb.weight.nbytes for t in tables) / 2**20
        state_mb = sum(v.nbytes for opt in (learner.g_optimizer, learner.d_optimizer)
                       for st in opt.state.values() for v in st.values()
                       if torch.is_tensor(v)) / 2**20
        result["runs"][label] = {
            "items": n_items, "loss": loss,
            "sampled": uses_sampled(adv_cfg, learner.generator.n_items),
            "examples_per_s": n / seconds, "seconds": seconds, "examples": n,
            "rows_s": rows_s, "item_tables_mb": table_mb, "optimizer_state_mb": state_mb}
    base = result["runs"][runs[0][0]]["examples_per_s"]
    for label, r in result["runs"].items():
        r["vs_10k"] = r["examples_per_s"] / base
        rows.append((label, f"{r['examples_per_s']:8.0f} examples/s  {r['vs_10k']:.2f}x 10k  "
                            f"({'sampled' if r['sampled'] else 'full'} softmax; tables "
                            f"{r['item_tables_mb']:.0f} MB + optimizer "
                            f"{r['optimizer_state_mb']:.0f} MB)"))
    big = result["runs"][runs[1][0]]
    result["goal"] = "examples/s at the large catalogue >= 0.5x the 10k-item figure"
    result["goal_met"] = big["vs_10k"] >= 0.5
    path = write_result("train-scale", result)
    print_table(f"bench/train --scale (mode {mode}, batch {args.batch_size}, "
                f"{args.threads} threads)", [*rows, ("results", str(path))])
    return 0


def detector_cost(data: list[list[TrainingExample]], warmup: int, model_cfg: ModelConfig,
                  adv_cfg: AdversarialConfig) -> dict[str, float | int | str]:
    """The default mode with the detector and filter on, over the same batches."""
    mode = TrainerSettings.trainer_mode  # the sidecar's default mode
    learner = OnlineLearner(model_cfg, TrainConfig(mode=mode, seed=0), adv_cfg)
    guard = TrainingFilter(learner, DetectorConfig(min_users=50))
    rounds: list[float] = []
    train_round = guard.detector.train_round

    def timed_round(*a: object, **k: object) -> dict[str, float]:
        t0 = time.perf_counter()
        out = train_round(*a, **k)  # type: ignore[arg-type]
        if out:
            rounds.append(time.perf_counter() - t0)
        return out

    guard.detector.train_round = timed_round  # type: ignore[method-assign]
    for bi, b in enumerate(data[:warmup]):
        learner.train_batch(guard.admit(b, bi))
    n, admit_s, examples = 0, 0.0, 0
    timed_from = len(rounds)
    started = time.perf_counter()
    for bi, b in enumerate(data[warmup:], start=warmup):
        t0 = time.perf_counter()
        kept = guard.admit(b, bi)
        admit_s += time.perf_counter() - t0
        examples += len(b)
        n += int(learner.train_batch(kept)["examples"])
    seconds = time.perf_counter() - started
    timed = rounds[timed_from:]
    return {"mode": mode, "examples_per_s": n / seconds, "seconds": seconds, "examples": n,
            "rounds": len(timed), "round_s": sum(timed) / max(1, len(timed)),
            "score_us_per_example": (admit_s - sum(timed)) / max(1, examples) * 1e6,
            "flagged_users": len(guard.flagged)}


COLD_START_PACKAGES = (ENCODER_PACKAGE, "sentence-transformers", "scikit-learn")
NEW_ITEMS = 1000  # catalogue items published and never clicked: ranked by content


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _titles(n: int, seed: int = 0) -> list[str]:
    """Catalogue texts shaped like MovieLens ones (title, year, genres), made up."""
    rng = np.random.default_rng(seed)
    words = ("night city love dark river king last war house blue girl road star lost "
             "summer ghost man winter secret island game heart storm fire golden").split()
    genres = ("Action Adventure Animation Children Comedy Crime Documentary Drama Fantasy "
              "Horror Musical Mystery Romance Sci-Fi Thriller War Western").split()
    return [" ".join(w.title() for w in rng.choice(words, rng.integers(1, 5)))
            + f" ({rng.integers(1930, 2020)}). "
            + ", ".join(rng.choice(genres, rng.integers(1, 4), replace=False))
            for _ in range(n)]


def _closure(name: str) -> set[str]:
    """The installed distributions ``name`` needs, itself included (normalized names)."""
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    todo, seen = [name], set()
    while todo:
        dist = norm(todo.pop())
        if dist in seen:
            continue
        try:
            reqs = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        seen.add(dist)
        for req in reqs:
            if "extra ==" in req:
                continue
            todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    return seen


def _installed_mb(dists: set[str]) -> float:
    total = 0
    for dist in dists:
        for f in importlib.metadata.distribution(dist).files or []:
            path = Path(f.locate())
            if path.is_file():
                total += path.stat().st_size
    return total / 2**20


def content_cost(data: list[list[TrainingExample]], warmup: int, model_cfg: ModelConfig,
                 adv_cfg: AdversarialConfig, n_items: int,
                 encode_items: int) -> dict[str, float | int | str]:
    """The text encoder's cost, and the default mode with every item's content known."""
    encoder = TextEncoder()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    encoder.encode(["warm up"])
    load_s = time.perf_counter() - t0
    rss_encoder = _rss_mb() - rss0
    texts = _titles(encode_items)
    t0 = time.perf_counter()
    encoder.encode(texts)
    encode_s = time.perf_counter() - t0
    # every item of the stream gets content (as if the catalogue were published first),
    # vectors made up: their values do not change the cost
    items = sorted({e.item for b in data for e in b} | {e2 for b in data for e in b
                                                       for e2 in e.history})
    items += [f"new-{n}" for n in range(NEW_ITEMS)]  # published, never clicked
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(items), 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    mode = TrainerSettings.trainer_mode
    learner = OnlineLearner(model_cfg, TrainConfig(mode=mode, seed=0), adv_cfg)
    learner.add_catalogue(items, vectors)
    table = learner.content
    assert table is not None
    # the raw vectors (kept to refit the axes), the flags, the axes, and the projected
    # table the content score runs on (rebuilt for each export and evaluation)
    content_bytes = (table.vectors.nbytes + table.has.nbytes + table.axes.nbytes
                     + table.projected(len(learner.vocab) + 1).nbytes)
    for b in data[:warmup]:
        learner.train_batch(b)
    n = 0
    started = time.perf_counter()
    for b in data[warmup:]:
        n += int(learner.train_batch(b)["examples"])
    seconds = time.perf_counter() - started
    serve = _serving_cost(learner)
    # what the cold-start packages (the encoder, and scikit-learn for the TF-IDF baseline)
    # add to an install of the rest of the image's (serving + trainer) requirements
    others = set()
    for req in importlib.metadata.requires("advrec") or []:
        name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]
        if name not in COLD_START_PACKAGES and (
                "extra ==" not in req or any(f'extra == "{x}"' in req
                                             for x in ("serving", "trainer"))):
            others |= _closure(name)
    added = set().union(*(_closure(name) for name in COLD_START_PACKAGES)) - others
    return {"mode": mode, "examples_per_s": n / seconds, "seconds": seconds, "examples": n,
            "catalogue_items": len(items), "content_mb": content_bytes / 2**20,
            "content_bytes_per_item": content_bytes / len(items),
            "encoder": encoder.meta, "encoder_load_s": load_s, "encoder_rss_mb": rss_encoder,
            "encode_items": encode_items, "encode_batch": encoder.batch_size,
            "encode_ms_per_item": 1000 * encode_s / encode_items,
            "install_mb": _installed_mb(added), "install_packages": sorted(added),
            "new_items": NEW_ITEMS, **serve}


def _serving_cost(learner: OnlineLearner, calls: int = 300) -> dict[str, float]:
    """One history per call through onnxruntime, the exported graph with the content score
    of the never-clicked items and without it (the same model otherwise), alternating."""
    import onnxruntime as ort

    from advrec.bundle import INPUT_NAME
    from trainer.export import export_onnx, scoring_model

    with_cold = scoring_model(learner)
    sessions = {}
    for name, model in (("with_content", with_cold), ("without", with_cold.scorer)):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sessions[name] = ort.InferenceSession(export_onnx(model, learner.model_cfg.max_len),
                                              opts, providers=["CPUExecutionProvider"])
    history = learner._encode([learner.vocab.items()[:12]])  # (1, L)
    spent = dict.fromkeys(sessions, 0.0)
    for _ in range(calls):
        for name, session in sessions.items():
            t0 = time.perf_counter()
            session.run(None, {INPUT_NAME: history})
            spent[name] += time.perf_counter() - t0
    return {"serve_us_with_content": 1e6 * spent["with_content"] / calls,
            "serve_us_without": 1e6 * spent["without"] / calls,
            "serve_items": learner.generator.n_items}


if __name__ == "__main__":
    sys.exit(main())
