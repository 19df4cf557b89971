"""cluster.ingest, cluster.shards, minimind.sources: input resolution, rejects, the Parquet cache (written by
parallel tasks, committed atomically), and what each Ray Train worker reads.

Tests that tokenise use the session's local Ray cluster (`ray_cluster`); the rest run without Ray.
"""
from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import cluster.ingest as ingest
import cluster.shards as shards
from cluster.config import BUNDLED_DATA
from cluster.ingest import DataSpec, iter_records, prepare_dataset
from cluster.shards import iter_local_batches, plan_epoch, steps_per_epoch
from minimind.sources import resolve_inputs, resolve_paths
from minimind.tokenizer import Tokenizer

BUNDLED = BUNDLED_DATA


@pytest.fixture(scope="module")
def tok(project_tokenizer) -> Tokenizer:
    return Tokenizer.from_dir(project_tokenizer)


@pytest.fixture(scope="module")
def poems(tmp_path_factory) -> Path:
    """The bundled pretraining sample (685 texts), as its own .jsonl.gz in a directory."""
    d = tmp_path_factory.mktemp("poetry")
    with gzip.open(d / "poems.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write((BUNDLED / "sample_corpus.jsonl").read_text(encoding="utf-8"))
    return d


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# --------------------------------------------------------------------------------------------- inputs


@pytest.mark.timeout(30)
def test_resolve_paths_files_directories_globs_uris(tmp_path):
    for name in ("a.jsonl", "b.jsonl.gz", "notes.txt", "sub/c.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")

    def names(paths):
        return [Path(p.split("://")[-1]).relative_to(tmp_path).as_posix() for p, _, _ in resolve_paths(paths)]
    assert names([str(tmp_path)]) == ["a.jsonl", "b.jsonl.gz"]          # a directory: its jsonl files
    assert names([f"{tmp_path}/*.jsonl*"]) == ["a.jsonl", "b.jsonl.gz"]
    assert names([f"{tmp_path}/*/c.jsonl"]) == ["sub/c.jsonl"]
    assert names([f"file://{tmp_path}/sub/c.jsonl", str(tmp_path / "a.jsonl")]) == ["sub/c.jsonl", "a.jsonl"]
    assert names([str(tmp_path / "a.jsonl"), f"{tmp_path}/a.*"]) == ["a.jsonl"]  # named twice, read once
    with pytest.raises(ValueError, match="no such file or directory"):
        resolve_paths([str(tmp_path / "missing.jsonl")])
    with pytest.raises(ValueError, match="no file matches"):
        resolve_paths([f"{tmp_path}/*.parquet"])


@pytest.mark.timeout(30)
def test_iter_records_gives_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b'{"text": "a"}\n\n{"text": \n{"text": "b"}')  # a blank line, a broken one, no final newline
    got = list(iter_records([str(path)], block_bytes=8))
    assert [(line, rec) for _, line, rec in got if isinstance(rec, dict)] == [(1, {"text": "a"}), (4, {"text": "b"})]
    (_, line, err), = [g for g in got if isinstance(g[2], Exception)]
    assert line == 3 and isinstance(err, ValueError) and f"{path}:3: malformed JSON" in str(err)


# --------------------------------------------------------------------------------------------- prepare


@pytest.mark.timeout(60)
def test_prepare_poetry_packed_and_padded(ray_cluster, tok, poems, tmp_path):
    packed = prepare_dataset(DataSpec((str(poems),), "pretrain", 64), tok, tmp_path, rows_per_shard=64)
    padded = prepare_dataset(DataSpec((str(poems),), "pretrain", 64, pack=False), tok, tmp_path,
                             rows_per_shard=64)
    m = packed.manifest
    texts = [json.loads(line)["text"] for line in gzip.open(poems / "poems.jsonl.gz", "rt", encoding="utf-8")]
    assert m["records"] == len(texts) == 685 and m["rejects"] == 0 and m["files"][0]["rows"] == m["rows"]
    assert m["tokenizer"] == tok.fingerprint() and m["row_len"] == 65 and m["format"] == "pretrain"
    assert m["padding_fraction"] < 0.01 and padded.manifest["padding_fraction"] > 0.1
    assert sum(packed.shard_rows) == m["rows"] and set(packed.shard_rows[:-1]) == {64}
    # Packing keeps every token: real tokens = the documents' tokens plus one separator each.
    assert m["real_tokens"] == sum(len(ids) + 1 for ids in tok.encode_batch(texts))
    # The cache's content depends on the inputs only, not on the run that wrote it.
    again = prepare_dataset(DataSpec((str(poems),), "pretrain", 64), tok, tmp_path / "again", rows_per_shard=64)
    assert all(pq.read_table(a).equals(pq.read_table(b)) for a, b in zip(packed.shard_files, again.shard_files))
    batch = next(iter_local_batches(packed, batch_size=4))
    assert batch["input_ids"].shape == (4, 65) and str(batch["input_ids"].dtype) == "torch.int32"
    assert str(batch["loss_mask"].dtype) == "torch.float32" and (batch["loss_mask"][:, 0] == 0).all()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt, source", [("pretrain", "minimind/pretrain_sample.jsonl"),
                                         ("chat", "minimind/sft_sample.jsonl"),
                                         ("chat", "minimind/lora_identity.jsonl"),
                                         ("pretrain", "bundled/sample_corpus.jsonl"),
                                         ("chat", "bundled/sample_sft.jsonl"),
                                         ("chat", "bundled/sample_reason.jsonl"),
                                         ("dpo", "bundled/sample_dpo.jsonl")])
def test_prepare_real_minimind_samples(ray_cluster, tok, request, tmp_path, fmt, source):
    """MiniMind's own sample files with its tokenizer (they need the real data beside the checkout), and the
    bundled ones with the project's."""
    root, name = source.split("/")
    if root == "bundled":
        path = BUNDLED / name
    else:
        path = request.getfixturevalue("shared_data") / root / name
        tok = Tokenizer.from_dir(path.parent)
    n_lines = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    p = prepare_dataset(DataSpec((str(path),), fmt, 256), tok, tmp_path)
    assert p.manifest["records"] == n_lines and p.manifest["rejects"] == 0
    ids_key, mask_key = ("chosen_ids", "chosen_mask") if fmt == "dpo" else ("input_ids", "loss_mask")
    complete = 0
    for batch in iter_local_batches(p, batch_size=1):
        ids, mask = batch[ids_key][0], batch[mask_key][0]
        assert ids.shape == (257,) and mask[0] == 0
        if fmt != "pretrain" and (ids == tok.pad_id).any():  # not truncated
            # The trained tokens are the assistant turns, each closed by <|im_end|>; never a role header.
            trained = tok.decode(ids[mask > 0].tolist())
            assert trained.endswith("<|im_end|>") and "<|im_start|>" not in trained
            complete += 1
    assert fmt == "pretrain" or complete > 0


@pytest.mark.timeout(60)
def test_bad_lines_go_to_the_rejects_file_and_too_many_stop_the_job(ray_cluster, tok, tmp_path, caplog):
    good = [json.dumps({"text": f"第{i}首诗"}).encode() for i in range(300)]
    bad = [b'{"text": "unterminated', b'{"title": "no text"}', b'{"text": 42}', b'{"text": ""}',
           b'{"text": "\xff\xfe"}']
    lines = good[:100] + bad[:2] + good[100:200] + bad[2:] + good[200:]
    path = write_lines(tmp_path / "in.jsonl", lines)
    spec = DataSpec((str(path),), "pretrain", 32, reject_threshold=0.02)
    with caplog.at_level(logging.WARNING, logger="cluster.ingest"):
        p = prepare_dataset(spec, tok, tmp_path / "cache")
    assert p.manifest["records"] == 300 and p.manifest["rejects"] == 5
    assert "5 records rejected" in caplog.text
    rejects = [json.loads(line) for line in Path(p.manifest["rejects_file"]).read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in rejects] == [(str(path), n) for n in (101, 102, 203, 204, 205)]
    assert ["malformed JSON" in rejects[0]["error"], "missing field 'text'" in rejects[1]["error"],
            "is int" in rejects[2]["error"], "is empty" in rejects[3]["error"],
            "invalid UTF-8" in rejects[4]["error"]] == [True] * 5
    # The cache remembers the threshold it was accepted under: a stage at its default (1%) reuses it, warned.
    assert p.manifest["reject_threshold"] == 0.02
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cluster.ingest"):
        again = prepare_dataset(DataSpec((str(path),), "pretrain", 32), tok, tmp_path / "cache")
    assert again.path == p.path and "but was accepted at 2.00% when it was prepared" in caplog.text
    # Over the threshold: a clear error, on a fresh run (which leaves no cache) and from a cache accepted lower.
    message = r"5 of 305 records \(1.64%\) were rejected, above the threshold of 1.00% \(--reject-threshold\)"
    with pytest.raises(ValueError, match=message):
        prepare_dataset(DataSpec((str(path),), "pretrain", 32), tok, tmp_path / "fresh")
    manifest = Path(p.path, "manifest.json")
    manifest.write_text(json.dumps({**p.manifest, "reject_threshold": 0.01}), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        prepare_dataset(DataSpec((str(path),), "pretrain", 32), tok, tmp_path / "cache")
    assert not list((tmp_path / "fresh").glob("*/manifest.json"))
    assert len(list((tmp_path / "fresh").glob("*.rejects.jsonl"))) == 1


@pytest.mark.timeout(60)
def test_a_wrong_field_mapping_stops_early(ray_cluster, tok, tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [json.dumps({"body": f"poem {i}"}).encode() for i in range(40_000)])
    with pytest.raises(ValueError, match=r"missing field 'text'"):
        prepare_dataset(DataSpec((str(path),), "pretrain", 32), tok, tmp_path, block_bytes=64 << 10)
    rejects, = tmp_path.glob("*.rejects.jsonl")
    assert 10_000 <= len(rejects.read_text().splitlines()) < 40_000


@pytest.mark.timeout(60)
def test_cache_is_reused_for_the_same_inputs(ray_cluster, tok, tmp_path, caplog, monkeypatch):
    path = write_lines(tmp_path / "in.jsonl", [json.dumps({"text": f"text {i}"}).encode() for i in range(50)])
    first = prepare_dataset(DataSpec((str(path),), "pretrain", 16), tok, tmp_path / "cache")

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")
    monkeypatch.setattr(ingest, "_tokenise", no_tokenising)
    with caplog.at_level(logging.INFO, logger="cluster.ingest"):
        again = prepare_dataset(DataSpec((str(path),), "pretrain", 16, seed=5), tok, tmp_path / "cache")
    assert again.path == first.path and "reusing cache" in caplog.text
    monkeypatch.undo()
    # Any change to what the rows hold gets a new cache: the data, the row length, the format options.
    with open(path, "ab") as f:
        f.write(json.dumps({"text": "one more"}).encode() + b"\n")
    changed = prepare_dataset(DataSpec((str(path),), "pretrain", 16), tok, tmp_path / "cache")
    assert changed.path != first.path and changed.manifest["records"] == 51
    assert ingest.cache_key(DataSpec((str(path),), "pretrain", 16), [], tok) != \
        ingest.cache_key(DataSpec((str(path),), "pretrain", 17), [], tok) != \
        ingest.cache_key(DataSpec((str(path),), "pretrain", 17, pack=False), [], tok)


# ------------------------------------------------------------------------------------------ the plan


@pytest.mark.timeout(30)
@pytest.mark.parametrize("shard_rows, world, batch", [((64,) * 9 + (17,), 2, 8), ((5,) * 7, 3, 2),
                                                      ((100,), 4, 3), ((10, 10, 3), 2, 11)])
def test_plan_covers_rows_once_per_epoch_and_resumes(shard_rows, world, batch):
    steps = sum(shard_rows) // (world * batch)
    offsets = np.cumsum((0,) + shard_rows)
    orders = []
    for epoch in range(3):
        seen = []
        for rank in range(world):
            rows = [(p.shard, r) for p in plan_epoch(shard_rows, 7, epoch, rank, world, batch)
                    for r in range(p.start, p.stop)]
            assert len(rows) == steps * batch                 # every worker: the same number of batches
            for skip in (1, steps - 1):                       # resuming reads only what is left
                resumed = [(p.shard, r) for p in plan_epoch(shard_rows, 7, epoch, rank, world, batch, skip)
                           for r in range(p.start, p.stop)]
                assert resumed == rows[skip * batch:]
            seen += [offsets[s] + r for s, r in rows]
        assert len(set(seen)) == len(seen)                    # at most once per epoch
        assert sum(shard_rows) - len(seen) < world * batch    # only a remainder under one round is dropped
        orders.append(seen)
    assert plan_epoch(shard_rows, 7, 1, 0, world, batch) == plan_epoch(shard_rows, 7, 1, 0, world, batch)
    if len(shard_rows) > 5:  # (in-shard order is drawn when reading; here only shard order differs)
        assert orders[0] != orders[1]


# ------------------------------------------------------------------------------------------ Ray Train


def _run_trainer(storage: Path, name: str, prepared, out: Path, epochs: int, batch: int, skip: int):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.shards import train_datasets

    def train_fn(config):
        # Defined here so Ray ships it by value: the workers cannot import the test module.
        import json as json_
        import ray.train
        from cluster.shards import iter_train_batches
        rank = ray.train.get_context().get_world_rank()
        seen = []
        for b in iter_train_batches(config["batch"], epochs=config["epochs"], seed=3, skip_batches=config["skip"]):
            shape = (config["batch"], config["row_len"])
            assert b["input_ids"].shape == shape and b["loss_mask"].shape == shape
            seen.append(b["row_id"].tolist())
        with open(f"{config['out']}/rank{rank}.json", "w") as f:
            json_.dump(seen, f)
        ray.train.report({"batches": len(seen)})

    datasets, dataset_config = train_datasets(prepared, 2, epochs, seed=3)
    TorchTrainer(train_fn, train_loop_config={"batch": batch, "epochs": epochs, "skip": skip, "out": str(out),
                                              "row_len": prepared.manifest["row_len"]},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=str(storage), name=name),
                 datasets=datasets, dataset_config=dataset_config).fit()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.timeout(240)
def test_train_workers_see_each_row_once_per_epoch_and_replay_exactly(ray_cluster, tok, poems, tmp_path):
    prepared = prepare_dataset(DataSpec((str(poems),), "pretrain", 64), tok, tmp_path / "cache",
                               rows_per_shard=100)
    batch, epochs = 8, 2
    steps = steps_per_epoch(prepared, batch, 2)
    (tmp_path / "a").mkdir()
    runs = _run_trainer(tmp_path / "ray", "first", prepared, tmp_path / "a", epochs, batch, skip=0)
    for rank, batches in enumerate(runs):
        assert len(batches) == epochs * steps
        # Ray Data in the worker reads exactly what the Ray-free plan says, batch for batch.
        local = [b["row_id"].tolist() for b in iter_local_batches(prepared, batch, epochs, seed=3, rank=rank,
                                                                   world_size=2)]
        assert batches == local
    epoch_rows = [[r for w in runs for b in w[e * steps:(e + 1) * steps] for r in b] for e in range(epochs)]
    for rows in epoch_rows:
        assert len(rows) == len(set(rows)) == 2 * steps * batch
        assert prepared.num_rows - len(rows) < 2 * batch
    assert epoch_rows[0] != epoch_rows[1]
    # A second run with the same seed, resumed 3 batches into epoch 1, sees exactly the rest of the first.
    (tmp_path / "b").mkdir()
    resumed = _run_trainer(tmp_path / "ray", "second", prepared, tmp_path / "b", epochs, batch, skip=steps + 3)
    assert resumed == [w[steps + 3:] for w in runs]


# ------------------------------------------------------------------------------------ bad input (issue 13)


@pytest.mark.timeout(30)
def test_symlink_loops_and_aliases_read_each_file_once(tmp_path, caplog):
    (tmp_path / "loop" / "d").mkdir(parents=True)
    write_lines(tmp_path / "loop" / "d" / "x.jsonl", [b'{"text": "a"}'])
    (tmp_path / "loop" / "d" / "up").symlink_to("..")     # a loop: loop/d/up/d/up/... is loop/d again
    (tmp_path / "loop" / "d" / "self").symlink_to(".")    # a second loop: pyarrow's listing went exponential
    (tmp_path / "loop" / "alias.jsonl").symlink_to("d/x.jsonl")
    real = str(tmp_path / "loop" / "d" / "x.jsonl")
    for pattern in ("loop/*/x.jsonl", "loop/**/x.jsonl"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="minimind.sources"):
            assert [f[0] for f in resolve_paths([f"{tmp_path}/{pattern}"])] == [real]
        assert f"symlink loop: {tmp_path}/loop/d/up leads back to {tmp_path}/loop" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="minimind.sources"):
        got = resolve_paths([str(tmp_path / "loop" / "alias.jsonl"), real, f"{tmp_path}/loop/d/*.jsonl"])
    assert [f[0] for f in got] == [str(tmp_path / "loop" / "alias.jsonl")]
    assert f"{real} is {tmp_path}/loop/alias.jsonl" in caplog.text


@pytest.mark.timeout(30)
def test_a_directory_names_what_it_skipped(tmp_path, caplog):
    for name in ("a.jsonl", "b.json", "notes.txt", "c.jsonl.gz.part", "sub/d.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="minimind.sources"):
        files, skipped = resolve_inputs([str(tmp_path)])
    assert [f[0] for f in files] == [str(tmp_path / "a.jsonl")]
    assert skipped == [f"{tmp_path}/{n}" for n in ("b.json", "c.jsonl.gz.part", "notes.txt", "sub/")]
    assert "skipped 4 entries that are not .jsonl or .jsonl.gz" in caplog.text and "notes.txt" in caplog.text


@pytest.mark.timeout(60)
def test_a_truncated_gz_fails_in_one_clean_line(ray_cluster, tok, tmp_path):
    lines = [json.dumps({"text": f"第{i}首 " + "床前明月光，" * (i % 50)}).encode() for i in range(40_000)]
    packed = gzip.compress(b"\n".join(lines) + b"\n")
    path = tmp_path / "poems.jsonl.gz"
    path.write_bytes(packed[:len(packed) * 2 // 3])
    (tmp_path / "extra.txt").write_text("not data")
    with pytest.raises(ValueError) as info:
        prepare_dataset(DataSpec((str(tmp_path),), "pretrain", 32), tok, tmp_path / "cache",
                        block_bytes=1 << 20)
    message = str(info.value)
    assert type(info.value) is ValueError and "\n" not in message and "\x1b" not in message
    assert message.startswith(f"{path}: cannot read after line ") and "ray::" not in message
    intact = int(message.split("cannot read after line ")[1].split(":")[0])
    assert 10_000 < intact < 40_000  # near where the stream breaks, not line 1
    assert message.endswith(": Truncated compressed stream")
    assert not list((tmp_path / "cache").glob("*/manifest.json"))


@pytest.mark.timeout(60)
def test_prepare_defaults_meet_the_stages_cache(tok, tmp_path):
    from cluster.launcher import data_spec as stage_spec
    from stages.prepare import STAGE_FORMATS, PrepareConfig, data_spec, stage_defaults
    path = write_lines(tmp_path / "in.jsonl", [b'{"text": "x"}'])
    files = resolve_paths([str(path)])
    for stage in STAGE_FORMATS:
        defaults = stage_defaults(stage)
        ours = data_spec(PrepareConfig(stage=stage, data=(str(path),), reject_threshold=0.1))
        theirs = stage_spec(type(defaults)(data=(str(path),)), __import__("types").SimpleNamespace(
            data_format=STAGE_FORMATS[stage]))
        assert ours.max_seq_len == defaults.max_seq_len, stage
        assert ingest.cache_key(ours, files, tok) == ingest.cache_key(theirs, files, tok), stage
    assert data_spec(PrepareConfig(stage="pretrain", data=(str(path),))).max_seq_len == 256
    assert data_spec(PrepareConfig(stage="dpo", data=(str(path),), max_seq_len=64)).max_seq_len == 64


# ------------------------------------------------------------------------------ validation split (issue 12)


def _decoded_docs(tok, prepared) -> list[str]:
    # Unpacked rows hold bos + document + eos: each row's text, markers included (compare with _row_text).
    docs = []
    for b in iter_data_rows(prepared):
        ids = b["input_ids"][:int(b["length"])].tolist()
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        docs.append(tok.decode(ids))
    return docs


def _row_text(tok, text: str) -> str:
    """An unpacked row of `text`: one bos, the text, one eos; the bundled sample's MiniMind2-style texts
    already start with bos and end with eos, which are not doubled."""
    ids = tok.encode(text)
    ids = ids[1:] if ids[:1] == [tok.bos_id] else ids
    ids = ids[:-1] if ids[-1:] == [tok.eos_id] else ids
    return tok.decode([tok.bos_id, *ids, tok.eos_id])


def iter_data_rows(prepared):
    for batch in shards.iter_eval_batches(prepared, batch_size=64):
        for i in range(len(batch["row_id"])):
            yield {k: v[i] for k, v in batch.items()}


@pytest.mark.timeout(120)
def test_validation_split_is_disjoint_complete_and_stable(ray_cluster, tok, tmp_path):
    from minimind.formats import in_val_split
    corpus = BUNDLED / "sample_corpus.jsonl"
    raw = [line for line in corpus.read_bytes().split(b"\n") if line.strip()]
    texts = [json.loads(line)["text"] for line in raw]
    longest = max(len(tok.encode(t)) for t in texts) + 2
    spec = DataSpec((str(corpus),), "pretrain", longest, pack=False, val_fraction=0.2)
    train, val = ingest.prepare_splits(spec, tok, tmp_path / "a")
    assert train.path != val.path and (train.manifest["split"], val.manifest["split"]) == ("train", "val")
    assert train.manifest["records"] + val.manifest["records"] == len(raw)
    assert train.manifest["held_out"] == val.manifest["records"] and val.manifest["held_out"] == len(raw) - \
        val.manifest["records"]
    assert 0.1 < val.manifest["records"] / len(raw) < 0.3
    val_docs, train_docs = _decoded_docs(tok, val), _decoded_docs(tok, train)
    # Which document went where, checked on the raw records: the hash of each line decides.
    want_val = sorted(t for line, t in zip(raw, texts) if in_val_split(line, 0.2))
    assert sorted(val_docs) == sorted(_row_text(tok, t) for t in want_val)
    assert sorted(train_docs + val_docs) == sorted(_row_text(tok, t) for t in texts)
    assert not set(val_docs) & set(train_docs)
    # A second run elsewhere, with another seed: the same split, byte for byte.
    train2, val2 = ingest.prepare_splits(DataSpec((str(corpus),), "pretrain", longest, pack=False,
                                                val_fraction=0.2, seed=7), tok, tmp_path / "b")
    assert (train2.path.name, val2.path.name) == (train.path.name, val.path.name)
    assert sorted(_decoded_docs(tok, val2)) == sorted(_row_text(tok, t) for t in want_val)
    # Packed: the two caches hold exactly the documents' tokens plus one separator each, nothing shared.
    ptrain, pval = ingest.prepare_splits(DataSpec((str(corpus),), "pretrain", 64, val_fraction=0.2), tok,
                                       tmp_path / "a")
    assert ptrain.manifest["real_tokens"] + pval.manifest["real_tokens"] == sum(len(tok.encode(t)) + 1
                                                                                for t in texts)
    assert pval.manifest["real_tokens"] == sum(len(tok.encode(t)) + 1 for t in want_val)
    # The whole-data cache keeps the key it had before splits existed (val_fraction is ignored there).
    assert ingest.cache_key(DataSpec((str(corpus),), "pretrain", 64, val_fraction=0.2), [], tok) == \
        ingest.cache_key(DataSpec((str(corpus),), "pretrain", 64), [], tok)
    with pytest.raises(ValueError, match="is empty: val_fraction 1e-09"):
        ingest.prepare_splits(DataSpec((str(corpus),), "pretrain", 64, val_fraction=1e-9), tok, tmp_path / "a")
    with pytest.raises(ValueError, match="needs a val_fraction above 0"):
        DataSpec((str(corpus),), "pretrain", 64, split="val")

    # Evaluation rows: every rank a contiguous share, all rows exactly once, short last batches allowed.
    for prepared in (pval, ptrain):
        n = prepared.num_rows
        for world, batch in ((1, 7), (2, 4), (3, 5), (n + 2, 3)):
            seen, counts = [], []
            for rank in range(world):
                batches = list(shards.iter_eval_batches(prepared, batch, rank, world))
                rows = [int(r) for b in batches for r in b["row_id"]]
                assert all(len(b["row_id"]) == batch for b in batches[:-1])
                assert all(b["input_ids"].shape[1] == prepared.manifest["row_len"] for b in batches)
                assert rows == list(range(rows[0], rows[0] + len(rows))) if rows else True  # contiguous
                counts.append(len(rows))
                seen += rows
            assert sorted(seen) == list(range(n)) and max(counts) - min(counts) <= 1
            if world > n:
                assert 0 in counts


@pytest.mark.timeout(180)
def test_prepare_script_writes_the_cache_the_stage_then_reads(ray_cluster, project_tokenizer, tmp_path):
    """`python stages/prepare.py --stage sft ... --val-fraction 0.1` end to end (joined to the test cluster):
    it prints both splits, which together hold every record once; the SFT stage given the same flags and
    `--cache-dir` resolves to exactly those caches and finds them complete, so it tokenises nothing again."""
    import os
    import re
    import subprocess
    import sys

    from cluster.launcher import prepare_data
    from stages.sft import SFT, SFTConfig
    data, cache = BUNDLED / "sample_sft.jsonl", tmp_path / "cache"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, "stages/prepare.py", "--stage", "sft", "--data", str(data),
                           "--out", str(cache), "--tokenizer", str(project_tokenizer), "--val-fraction", "0.1"],
                          cwd=BUNDLED.parents[1], env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    # One indented JSON object per split, each opening at the start of a line.
    printed = [json.loads(part) for part in re.split(r"(?m)^(?=\{)", done.stdout) if part.strip()]
    assert [p["split"] for p in printed] == ["train", "val"]
    assert sum(p["records"] for p in printed) == 200 and all(p["records"] for p in printed)
    assert printed[0]["max_seq_len"] == SFTConfig().max_seq_len
    manifests = {p["path"]: (Path(p["path"]) / "manifest.json").stat().st_mtime_ns for p in printed}

    cfg = SFTConfig(data=(str(data),), val_fraction=0.1, cache_dir=str(cache))
    train, val = prepare_data(cfg, SFT(), Tokenizer.from_dir(project_tokenizer), str(cache))
    assert [str(train.path), str(val.path)] == [p["path"] for p in printed]
    assert {p: (Path(p) / "manifest.json").stat().st_mtime_ns for p in manifests} == manifests  # read, not rewritten
    assert (train.manifest["records"], val.manifest["records"]) == (printed[0]["records"], printed[1]["records"])


# --------------------------------------------------------------- shards written by the tasks (issue 14)


def _cache_files(prepared) -> dict[str, bytes]:
    return {Path(f).name: Path(f).read_bytes() for f in prepared.shard_files}


@pytest.mark.timeout(120)
def test_two_prepares_give_identical_shards_manifests_and_plans(ray_cluster, tok, poems, tmp_path):
    """Many blocks of two files, tokenised and written by parallel tasks that finish in any order: the same
    shard bytes, the same manifest shards list and the same epoch plans, and row ids unique over the cache."""
    second = tmp_path / "more.jsonl"
    lines = gzip.decompress((poems / "poems.jsonl.gz").read_bytes()).splitlines()
    write_lines(second, lines[::-1])  # another file: the same poems in the other order
    spec = DataSpec((str(poems / "poems.jsonl.gz"), str(second)), "pretrain", 32)
    a = prepare_dataset(spec, tok, tmp_path / "a", rows_per_shard=40, block_bytes=16 << 10)
    b = prepare_dataset(spec, tok, tmp_path / "b", rows_per_shard=40, block_bytes=16 << 10)
    shards_a = a.manifest["shards"]
    assert len({s["file"].split("-")[2] for s in shards_a}) > 4 and {s["file"].split("-")[1] for s in shards_a} == \
        {"00000", "00001"}  # several blocks of each file
    assert shards_a == b.manifest["shards"] == sorted(shards_a, key=lambda s: s["file"])
    assert all(s["rows"] <= 40 for s in shards_a) and sum(s["rows"] for s in shards_a) == a.num_rows
    assert _cache_files(a) == _cache_files(b)
    assert all(len(body) == s["bytes"] for s, body in zip(shards_a, _cache_files(a).values()))
    assert "row_id" not in pq.read_schema(a.shard_files[0]).names  # computed when reading
    for epoch, rank in ((0, 0), (1, 1)):
        assert plan_epoch(a.shard_rows, 3, epoch, rank, 2, 8) == plan_epoch(b.shard_rows, 3, epoch, rank, 2, 8)
    batches = [[x["row_id"].tolist() for x in iter_local_batches(p, 8, seed=3)] for p in (a, b)]
    assert batches[0] == batches[1]
    rows = [int(r) for x in shards.iter_eval_batches(a, 64) for r in x["row_id"]]
    assert rows == list(range(a.num_rows))


def _no_trusted_cache(cache: Path) -> bool:
    made = [d for d in cache.iterdir() if d.is_dir()] if cache.is_dir() else []
    return all(shards.Prepared.read(d) is None or not shards.Prepared.read(d).trusted() for d in made) and \
        not [d for d in made if ".tmp-" in d.name]


@pytest.mark.timeout(180)
def test_a_failed_prepare_leaves_no_cache_a_later_run_trusts(ray_cluster, tok, poems, tmp_path, caplog):
    cache = tmp_path / "cache"
    # 1. A truncated .gz: the shards earlier blocks wrote go with the staging directory.
    lines = [json.dumps({"text": f"第{i}首 " + "床前明月光，" * (i % 50)}).encode() for i in range(20_000)]
    packed = gzip.compress(b"\n".join(lines) + b"\n")
    src = tmp_path / "in" / "poems.jsonl.gz"
    src.parent.mkdir()
    src.write_bytes(packed[:len(packed) * 2 // 3])
    with pytest.raises(ValueError, match="Truncated compressed stream"):
        prepare_dataset(DataSpec((str(src),), "pretrain", 32), tok, cache, block_bytes=64 << 10)
    assert _no_trusted_cache(cache)
    src.write_bytes(packed)
    good = prepare_dataset(DataSpec((str(src),), "pretrain", 32), tok, cache, block_bytes=64 << 10)
    assert good.trusted() and good.manifest["records"] == 20_000 and len(good.shard_files) > 1

    # 2. Too many rejects: nothing kept; the same cache (the threshold is not in its key) made again later.
    bad = write_lines(tmp_path / "bad.jsonl", [b'{"text": "ok"}'] * 50 + [b'{"title": "x"}'] * 5)
    with pytest.raises(ValueError, match="were rejected"):
        prepare_dataset(DataSpec((str(bad),), "pretrain", 16), tok, tmp_path / "rejects")
    assert _no_trusted_cache(tmp_path / "rejects")
    accepted = prepare_dataset(DataSpec((str(bad),), "pretrain", 16, reject_threshold=0.2), tok,
                               tmp_path / "rejects")
    assert accepted.trusted() and accepted.manifest["rejects"] == 5

    # 3. A shard cut short after a successful prepare: not trusted, never read, made again identically.
    before = _cache_files(good)
    victim = Path(good.shard_files[1])
    victim.write_bytes(victim.read_bytes()[:-10])
    assert not shards.Prepared.read(good.path).trusted()
    with pytest.raises(ValueError, match="not a complete prepared dataset"):
        shards.Prepared.load(good.path)
    with caplog.at_level(logging.WARNING, logger="cluster.ingest"):
        again = prepare_dataset(DataSpec((str(src),), "pretrain", 32), tok, cache, block_bytes=64 << 10)
    assert "is incomplete or damaged" in caplog.text
    assert again.path == good.path and again.trusted() and _cache_files(again) == before
    # A missing shard and a missing manifest count the same.
    Path(again.shard_files[0]).unlink()
    assert not shards.Prepared.read(again.path).trusted()
    (Path(again.path) / "manifest.json").unlink()
    assert shards.Prepared.read(again.path) is None
    remade = prepare_dataset(DataSpec((str(src),), "pretrain", 32), tok, cache, block_bytes=64 << 10)
    assert _cache_files(remade) == before


@pytest.mark.timeout(120)
def test_a_cache_under_a_file_uri_works_end_to_end(ray_cluster, tok, poems, tmp_path, caplog):
    uri = f"file://{tmp_path}/cache"
    spec = DataSpec((str(poems),), "pretrain", 64)
    p = prepare_dataset(spec, tok, uri, rows_per_shard=64)
    assert isinstance(p.path, str) and p.path.startswith(uri) and p.shard_files[0].startswith(f"{uri}/")
    assert p.trusted() and p.manifest["rejects_file"].startswith(uri)
    local = prepare_dataset(spec, tok, tmp_path / "local", rows_per_shard=64)
    assert p.manifest["shards"] == local.manifest["shards"]
    got = [b["row_id"].tolist() for b in iter_local_batches(p, batch_size=4, seed=1)]
    assert got == [b["row_id"].tolist() for b in iter_local_batches(local, batch_size=4, seed=1)] and got
    # Ray Data's read tasks (what a training worker runs) take the URI too.
    worker = shards.WorkerShard(tuple(p.shard_files), p.shard_rows, seed=1)
    assert [b["row_id"].tolist() for b in worker.iter_epoch(0, 4, device="cpu")] == got
    with caplog.at_level(logging.INFO, logger="cluster.ingest"):
        assert prepare_dataset(spec, tok, uri, rows_per_shard=64).path == p.path
    assert "reusing cache" in caplog.text
