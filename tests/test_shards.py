"""Shard streams over real Fashion-MNIST images: views, splitting, seeding, errors."""

import dataclasses
import gzip
import io
import json
import random
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from nrd_dist.data.augment import TrainViews, build_policy
from nrd_dist.data.noise import apply_noise
from nrd_dist.data.shards import (
    ShardError,
    ShardStream,
    StreamSpec,
    expand_urls,
    make_loader,
    manifest_counts,
    sample_seed,
    set_epoch,
)
from nrd_dist.data.writer import MANIFEST_NAME, ShardWriter
from nrd_dist.evaluate import LabelCorrectionViews

FMNIST = "/usr/share/datasets/fashion-mnist"
PER_SHARD = 30
NUM_SHARDS = 3


def fmnist_test_images(n):
    with gzip.open(f"{FMNIST}/t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(-1, 28, 28)[:n]
    with gzip.open(f"{FMNIST}/t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read()[8:], dtype=np.uint8)[:n].astype(int)
    return images, labels


def png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    images, clean = fmnist_test_images(PER_SHARD * NUM_SHARDS)
    noisy = (clean + 1) % 10  # a visible, known training label
    writer = ShardWriter(out, "train", PER_SHARD)
    for i in range(len(images)):
        writer.write(
            f"s{i:04d}", {"png": png(images[i]), "cls": str(noisy[i]).encode(), "clean.cls": str(clean[i]).encode()}
        )
    writer.close()
    pattern = str(out / "train-{000000..000002}.tar")
    return {"dir": out, "pattern": pattern, "images": images, "clean": clean, "noisy": noisy}


def stream(shards, **kw):
    policy = build_policy("fmnist")
    train = kw.pop("train", True)
    transform = TrainViews(policy, kw.pop("with_teacher", True)) if train else policy.eval
    return ShardStream(
        expand_urls(shards["pattern"]), transform, num_classes=10, channels=1, seed=kw.pop("seed", 0), train=train, **kw
    )


def collect(loader, num_batches=None):
    """Eval loaders end by themselves; training streams are endless: take num_batches."""
    it = iter(loader)
    batches = list(it) if num_batches is None else [next(it) for _ in range(num_batches)]
    del it
    keys = [k for b in batches for k in b["key"]]
    return batches, keys


def test_batches_carry_both_views_labels_and_keys(shards):
    loader = make_loader(stream(shards, shuffle_buffer=0), batch_size=9, workers=0)
    set_epoch(loader, 0)
    batches, keys = collect(loader, PER_SHARD * NUM_SHARDS // 9)
    b = batches[0]
    assert b["student"].shape == (9, 1, 28, 28) and b["student"].dtype == torch.float32
    assert b["teacher"].shape == (9, 1, 28, 28)
    assert not torch.equal(b["student"], b["teacher"])  # different augmentations, same images
    index = [int(k[1:]) for k in b["key"]]
    assert b["label"].tolist() == shards["noisy"][index].tolist()
    assert b["clean_label"].tolist() == shards["clean"][index].tolist()
    # one slot, no sample buffer: the first epoch's worth of samples is every sample once
    assert sorted(keys) == [f"s{i:04d}" for i in range(PER_SHARD * NUM_SHARDS)]


def test_no_teacher_view_for_baselines(shards):
    loader = make_loader(stream(shards, with_teacher=False), batch_size=10, workers=0)
    set_epoch(loader, 0)
    batch = collect(loader, 1)[0][0]
    assert "teacher" not in batch and batch["student"].shape[0] == 10


@pytest.mark.slow
def test_workers_seeded_order_and_augmentations(shards):
    loader = make_loader(stream(shards, shuffle_buffer=20, seed=7), batch_size=5, workers=2)
    orders = []
    for epoch in (0, 0, 1):
        set_epoch(loader, epoch)
        batches, keys = collect(loader, 18)
        orders.append((keys, batches[0]["student"]))
    assert orders[0][0] == orders[1][0]  # same (seed, epoch): same order ...
    assert torch.equal(orders[0][1], orders[1][1])  # ... and same augmentations in the workers
    assert orders[0][0] != orders[2][0]  # next epoch: a different order
    other_seed = make_loader(stream(shards, shuffle_buffer=20, seed=8), batch_size=5, workers=2)
    set_epoch(other_seed, 0)
    assert collect(other_seed, 18)[1] != orders[0][0]


@pytest.mark.slow
def test_persistent_workers_give_the_same_batches_as_fresh_ones(shards):
    """Persistent workers keep their copy of the stream: the epoch must still reach them
    (shard order, shuffle) and their augmentation RNGs must be reseeded per epoch, or a
    resumed run (fresh workers) would see other batches than the run it continues."""

    def epochs(persistent, which):
        loader = make_loader(stream(shards, shuffle_buffer=20, seed=3), batch_size=5, workers=2, persistent=persistent)
        out = []
        for epoch in which:
            set_epoch(loader, epoch)
            batches, keys = collect(loader, 7)
            out.append((keys, torch.cat([b["student"] for b in batches]), torch.cat([b["teacher"] for b in batches])))
        return out, loader

    persistent, loader = epochs(True, (0, 1, 2))
    workers = loader._iterator._workers  # private, read only: the same processes served every epoch
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    assert persistent[0][0] != persistent[1][0] != persistent[2][0]
    for epoch, fresh in ((0, epochs(False, (0,))[0][0]), (2, epochs(False, (2,))[0][0])):
        assert fresh[0] == persistent[epoch][0]
        assert torch.equal(fresh[1], persistent[epoch][1]) and torch.equal(fresh[2], persistent[epoch][2])
    del loader
    for w in workers:
        w.join(timeout=10)
    assert not any(w.is_alive() for w in workers)  # dropping the loader stops them


@pytest.mark.slow
def test_uneven_shards_never_run_dry_and_top_up_deterministically(shards):
    """3 shards over 2 ranks x 2 workers: the 4th slot has no dealt shard; every rank can
    still take the same number of batches (a collective would hang otherwise)."""
    per_rank = []
    for rank in (0, 1):
        loader = make_loader(stream(shards, rank=rank, world_size=2, seed=5, shuffle_buffer=0), batch_size=4, workers=2)
        set_epoch(loader, 0)
        _, keys = collect(loader, 12)  # 48 samples per rank: more than rank 1's dealt 30
        per_rank.append(keys)
        set_epoch(loader, 0)
        assert collect(loader, 12)[1] == keys  # top-ups are seeded too
    assert [len(k) for k in per_rank] == [48, 48]
    dealt = [stream(shards, rank=r, world_size=2, seed=5).shards_for(w, 2) for r in (0, 1) for w in (0, 1)]
    assert sorted(u for d in dealt for u in d) == sorted(expand_urls(shards["pattern"]))  # a partition
    assert [len(d) for d in dealt].count(0) == 1


def test_resampled_mode_draws_shards(shards):
    loader = make_loader(stream(shards, sampling="resampled", shuffle_buffer=0), batch_size=10, workers=0)
    set_epoch(loader, 3)
    _, keys = collect(loader, 9)
    assert len(keys) == 90 and len(set(keys)) < 90  # with replacement: repeats within an epoch
    with pytest.raises(ValueError, match="data.sampling"):
        stream(shards, sampling="bogus")


def test_ranks_partition_the_shards(shards):
    seen = []
    for rank in (0, 1):
        loader = make_loader(
            stream(shards, rank=rank, world_size=2, seed=3, train=False), batch_size=4, workers=2, drop_last=False
        )
        set_epoch(loader, 2)
        seen.append(set(collect(loader)[1]))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == PER_SHARD * NUM_SHARDS


def test_eval_stream_fixed_order_single_view(shards):
    loader = make_loader(stream(shards, train=False), batch_size=16, workers=0, drop_last=False)
    batches, keys = collect(loader)
    assert keys == [f"s{i:04d}" for i in range(PER_SHARD * NUM_SHARDS)]
    first = batches[0]["image"][0, 0]
    expected = (torch.tensor(shards["images"][0]).float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(first, expected)


def test_load_time_noise_is_keyed_on_the_clean_label(shards):
    spec = {"type": "symmetric", "rate": 0.5, "seed": 11}
    loader = make_loader(stream(shards, train=False, noise=spec), batch_size=100, workers=0, drop_last=False)
    batch = next(iter(loader))
    keys = batch["key"]
    clean = shards["clean"][[int(k[1:]) for k in keys]]
    assert batch["clean_label"].tolist() == clean.tolist()
    assert batch["label"].tolist() == apply_noise(keys, clean, spec, 10).tolist()
    assert (batch["label"].numpy() != clean).any()


def test_missing_pattern_and_empty_shards(tmp_path, shards):
    with pytest.raises(ShardError, match=r"no shard matches '.*nothing-\*\.tar'"):
        expand_urls(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ShardError, match=r"train-000003\.tar' does not exist"):
        expand_urls(str(shards["dir"] / "train-{000002..000009}.tar"))
    empty = tmp_path / "empty-000000.tar"
    empty.write_bytes(b"")
    with pytest.raises(ShardError, match="is empty"):
        expand_urls(str(empty))
    no_samples = tmp_path / "none-000000.tar"
    tarfile.open(no_samples, "w").close()
    s = ShardStream([str(no_samples)], build_policy("fmnist").eval, 10, channels=1, train=False)
    with pytest.raises(ShardError, match="none-000000.tar' holds no samples"):
        list(s)
    assert expand_urls(str(shards["dir"] / "train-*.tar")) == sorted(str(p) for p in shards["dir"].glob("train-*.tar"))


def flip_bit_in_idat(data: bytes) -> bytes:
    corrupted = bytearray(data)
    corrupted[data.index(b"IDAT") + 20] ^= 0x10
    return bytes(corrupted)


def test_bad_samples_are_skipped_and_reported_with_key_and_shard(tmp_path):
    images, _ = fmnist_test_images(2)
    cases = {
        "nolabel": ({"png": png(images[0])}, "has no .cls label"),
        "noimage": ({"cls": b"1"}, "has no image"),
        "badlabel": ({"png": png(images[0]), "cls": b"12"}, "label 12 is out of range"),
        "corrupt": ({"png": b"not a png", "cls": b"1"}, "cannot be decoded"),
        # one flipped bit in the pixel data: torchvision's decoder would SIGSEGV the process
        "bitrot": ({"png": flip_bit_in_idat(png(images[0])), "cls": b"1"}, "fails its CRC"),
        "cut": ({"png": png(images[0])[:-30], "cls": b"1"}, "truncated"),
    }
    for name, (fields, message) in cases.items():
        writer = ShardWriter(tmp_path, name, 10)
        writer.write("k0", fields)
        writer.write("k1", {"png": png(images[1]), "cls": b"3"})
        writer.close()
        s = ShardStream(
            [str(tmp_path / f"{name}-000000.tar")], build_policy("fmnist").eval, 10, channels=1, train=False
        )
        samples = list(s)
        assert [x["key"] for x in samples] == ["k1"]  # the bad one skipped, the good one kept
        assert re.search(f"bad sample: sample 'k0' in .*{name}-000000.tar.*{message}", samples[0]["bad"])


def test_a_truncated_shard_is_reported_and_the_stream_goes_on(tmp_path):
    images, labels = fmnist_test_images(30)
    for name in ("cut", "whole"):
        writer = ShardWriter(tmp_path, name, 100)
        for i in range(15):
            writer.write(f"{name}{i}", {"png": png(images[i]), "cls": str(int(labels[i])).encode()})
        writer.close()
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # as a crashed copy leaves it
    counts = {str(cut): 15, str(tmp_path / "whole-000000.tar"): 15}  # from the manifests, in a run
    s = ShardStream(list(counts), build_policy("fmnist").eval, 10, channels=1, train=False, expected_counts=counts)
    samples = list(s)
    keys = [x["key"] for x in samples]
    assert keys[-15:] == [f"whole{i}" for i in range(15)] and 0 < len(keys) - 15 < 15
    reports = [x["bad"] for x in samples if x["bad"]]
    assert len(reports) == 1 and reports[0].startswith("truncated shard: - in ") and str(cut) in reports[0]


def test_a_stream_of_nothing_but_bad_samples_stops_instead_of_searching_forever(tmp_path):
    images, _ = fmnist_test_images(1)
    writer = ShardWriter(tmp_path, "wrong", 1000)
    for i in range(ShardStream.MAX_BAD_IN_A_ROW):
        writer.write(f"k{i}", {"png": png(images[0]), "cls": b"42"})  # e.g. data.num_classes set too small
    writer.close()
    s = ShardStream(
        [str(tmp_path / "wrong-000000.tar")], build_policy("fmnist").eval, 10, channels=1, train=True, shuffle_buffer=0
    )
    with pytest.raises(ShardError, match="bad samples in a row, none usable.*label 42 is out of range"):
        next(iter(s))


def views_by_key(shards, urls=None, workers=0, batch_size=7, seed=0, **kw):
    """key -> (views [K, C, S, S], plain [C, S, S], shard URL) of a per-sample-seeded eval stream."""
    spec = StreamSpec(num_classes=10, channels=1, seed=seed, **kw)
    transform = LabelCorrectionViews(build_policy("fmnist"), views=3)
    s = ShardStream(
        urls or expand_urls(shards["pattern"]), transform, spec, train=False, per_sample_seed=True, with_shard=True
    )
    batches, _ = collect(make_loader(s, batch_size=batch_size, workers=workers, drop_last=False))
    return {
        key: (b["image"]["views"][i], b["image"]["plain"][i], b["shard"][i])
        for b in batches
        for i, key in enumerate(b["key"])
    }


def test_per_sample_seed_draws_a_samples_views_from_seed_and_key_alone(shards):
    """The views of a sample do not depend on the worker count, the batch size, the
    other samples read or the rank; a different seed redraws them."""
    urls = expand_urls(shards["pattern"])
    reference = views_by_key(shards)
    assert len(reference) == PER_SHARD * NUM_SHARDS
    assert all(shard == urls[int(key[1:]) // PER_SHARD] for key, (_, _, shard) in reference.items())
    for other in (
        views_by_key(shards, workers=2, batch_size=16),
        views_by_key(shards, urls=urls[1:]),
        views_by_key(shards, rank=1, world_size=2),
    ):
        assert other and set(other) <= set(reference)
        for key, (views, plain, shard) in other.items():
            assert torch.equal(views, reference[key][0]) and torch.equal(plain, reference[key][1])
            assert shard == reference[key][2]
    some_key, (views, _, _) = next(iter(reference.items()))
    assert not torch.equal(views[0], views[1])  # K different views of one sample
    assert not torch.equal(views, views_by_key(shards, seed=1)[some_key][0])
    assert sample_seed(0, some_key) == sample_seed(0, some_key) != sample_seed(1, some_key)


def test_per_sample_seed_leaves_the_global_rngs_alone(shards):
    """In the main process (workers=0) a per-sample-seeded stream draws nothing from the
    RNGs the training loop uses; an unseeded one draws its views from them."""

    def global_states():
        return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()

    torch.manual_seed(123)
    before = global_states()
    views_by_key(shards)
    after = global_states()
    assert torch.equal(after[0], before[0]) and after[1] == before[1] and (after[2] == before[2]).all()
    list(
        ShardStream(
            expand_urls(shards["pattern"]), LabelCorrectionViews(build_policy("fmnist"), 2), 10, channels=1, train=False
        )
    )
    assert not torch.equal(torch.get_rng_state(), before[0])


def test_stream_spec_is_the_keyword_form_and_comes_from_the_config(shards, tmp_path):
    from nrd_dist.config import load_config

    urls = expand_urls(shards["pattern"])
    by_keywords = ShardStream(urls, build_policy("fmnist").eval, 10, channels=1, seed=4, train=False)
    by_spec = ShardStream(urls, build_policy("fmnist").eval, StreamSpec(10, channels=1, seed=4), train=False)
    assert by_keywords.spec == by_spec.spec and by_keywords.seed == 4
    with pytest.raises(TypeError, match="not both"):
        ShardStream(urls, build_policy("fmnist").eval, StreamSpec(10), channels=1)
    with pytest.raises(TypeError):
        ShardStream(urls, build_policy("fmnist").eval, 10, chanels=1)  # a typo is an error, not ignored

    cfg = load_config(
        REPO / "configs" / "fmnist_demo.yaml",
        [f"data.train={shards['pattern']}", "run.seed=9", "data.storage={anon: true}"],
    )
    spec = StreamSpec.from_config(cfg, rank=1, world_size=2, expected_counts={urls[0]: 30})
    assert spec == StreamSpec(
        num_classes=10,
        channels=1,
        seed=9,
        shuffle_buffer=2000,
        noise=dataclasses.asdict(cfg.data.noise),
        rank=1,
        world_size=2,
        sampling="epoch",
        storage_options={"anon": True},
        retries=cfg.data.retries,
        retry_backoff_s=cfg.data.retry_backoff_s,
        expected_counts={urls[0]: 30},
    )
    assert spec.noise["type"] == "symmetric" and spec.noise["rate"] == 0.4
    assert StreamSpec.from_config(cfg, load_time_noise=False).noise is None


def test_manifest_counts_reads_the_manifest_beside_the_shards(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / MANIFEST_NAME).write_text(
        json.dumps({"shards": [{"name": "x-000000.tar", "count": 5}, {"name": "x-000001.tar", "count": 3}]})
    )
    (tmp_path / "b").mkdir()  # no manifest: its shards are left out
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / MANIFEST_NAME).write_text("{not json")  # unreadable: left out as well
    urls = [str(tmp_path / d / f"x-00000{i}.tar") for d in "abc" for i in (0, 1, 2)]
    assert manifest_counts(urls) == {urls[0]: 5, urls[1]: 3}
