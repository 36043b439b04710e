"""The content-addressed adapter store (tier 3): import, validation, limits, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from dora_adapter_factory import BASE_MODEL

from r3mes.cache.adapter_store import (
    AdapterNotFoundError,
    AdapterStore,
    AdapterStoreError,
    AdapterValidationError,
    BaseModelMismatchError,
    DigestMismatchError,
    ManifestCorruptError,
    StoreFullError,
    adapter_digest,
    inspect_adapter_dir,
)


def _store_snapshot(store: AdapterStore) -> tuple[bytes, list[str]]:
    manifest = store.manifest_path.read_bytes() if store.manifest_path.exists() else b""
    return manifest, sorted(p.name for p in store.objects.iterdir())


# ----------------------------------------------------------------------------- import


def test_add_records_digest_rank_modules_and_base_model(store, adapter_factory):
    src = adapter_factory("medical", rank=8, modules=("model.layers.0.self_attn.q_proj",))
    record = store.add(src, "medical_dora")
    assert record.digest == adapter_digest(src)
    assert record.rank == 8
    assert record.lora_alpha == 16.0
    assert record.target_modules == ["q_proj"]
    assert record.num_modules == 1
    assert record.base_model == BASE_MODEL
    assert record.size_bytes == sum(f.stat().st_size for f in src.iterdir())
    assert [r.id for r in store.list()] == ["medical_dora"]
    stored = store.path("medical_dora")
    assert stored == store.objects / record.digest
    assert (stored / "adapter_model.safetensors").read_bytes() == (
        src / "adapter_model.safetensors").read_bytes()


def test_manifest_survives_reopening(home, adapter_factory):
    AdapterStore(home).add(adapter_factory(), "a")
    reopened = AdapterStore(home)
    assert reopened.get("a").rank == 4
    data = json.loads(reopened.manifest_path.read_text())
    assert data["format"] == "r3mes-adapter-store" and "a" in data["adapters"]


def test_identical_content_under_two_ids_is_stored_once(store, adapter_factory):
    src = adapter_factory(seed=7)
    a = store.add(src, "a")
    b = store.add(src, "b")
    assert a.digest == b.digest
    assert len(list(store.objects.iterdir())) == 1
    assert store.total_bytes() == a.size_bytes
    store.remove("a")
    assert (store.objects / b.digest).is_dir(), "object still referenced by b must stay"
    store.remove("b")
    assert list(store.objects.iterdir()) == []


def test_existing_id_is_not_overwritten_without_replace(store, adapter_factory):
    first = store.add(adapter_factory(seed=1), "x")
    with pytest.raises(AdapterStoreError, match="already exists"):
        store.add(adapter_factory(seed=2), "x")
    assert store.get("x").digest == first.digest
    second = store.add(adapter_factory(seed=3), "x", replace=True)
    assert store.get("x").digest == second.digest != first.digest
    assert sorted(p.name for p in store.objects.iterdir()) == [second.digest]


@pytest.mark.parametrize("bad_id", ["", "../escape", "a/b", ".hidden", "x" * 200])
def test_invalid_adapter_id_is_rejected(store, adapter_factory, bad_id):
    with pytest.raises(ValueError, match="invalid adapter id"):
        store.add(adapter_factory(), bad_id)


# ----------------------------------------------------------------------------- refusals


def test_digest_mismatch_is_refused(store, adapter_factory):
    src = adapter_factory()
    with pytest.raises(DigestMismatchError, match="does not match the expected"):
        store.add(src, "a", expected_digest="0" * 64)
    assert store.list() == [] and list(store.objects.iterdir()) == []


def test_truncated_adapter_is_refused(store, adapter_factory):
    store.add(adapter_factory(seed=1), "keep")
    before = _store_snapshot(store)
    src = adapter_factory(seed=2)
    weights = src / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-17])
    with pytest.raises(AdapterValidationError, match="adapter_model.safetensors"):
        store.add(src, "truncated")
    assert _store_snapshot(store) == before
    assert not list(store.root.glob(".staging-*"))


def test_truncated_header_is_refused(store, adapter_factory):
    src = adapter_factory()
    weights = src / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(AdapterValidationError, match="truncated"):
        store.add(src, "a")


def test_garbage_weights_file_is_refused(store, adapter_factory):
    src = adapter_factory()
    garbage = (16).to_bytes(8, "little") + b"not json at all!"
    (src / "adapter_model.safetensors").write_bytes(garbage)
    with pytest.raises(AdapterValidationError, match="safetensors"):
        store.add(src, "a")


def test_missing_weights_file_is_refused(store, adapter_factory):
    src = adapter_factory()
    (src / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterValidationError, match="adapter_model.safetensors: missing"):
        store.add(src, "a")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"use_dora": False}, "use_dora must be true"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"r": 0}, "'r' must be a positive integer"),
        ({"target_modules": []}, "target_modules"),
        ({"rank_pattern": {"q_proj": "8"}}, "rank_pattern"),
    ],
)
def test_config_that_is_not_a_dora_adapter_is_refused(store, adapter_factory, overrides, message):
    src = adapter_factory(config_overrides=overrides)
    with pytest.raises(AdapterValidationError, match=message) as info:
        store.add(src, "a")
    assert "adapter_config.json" in str(info.value)


def test_adapter_with_a_rank_pattern_is_stored_with_each_module_rank(store, adapter_factory):
    # PEFT writes per-module ranks to rank_pattern (so does save_peft_adapter): the store
    # must accept what the loader loads.
    from r3mes.core.adapter_io import read_peft_adapter

    q_proj = "model.layers.0.self_attn.q_proj"
    src = adapter_factory(ranks={q_proj: 8}, config_overrides={"rank_pattern": {"q_proj": 8}})
    record = store.add(src, "a")
    info = inspect_adapter_dir(store.objects / record.digest)
    assert info.module_ranks == {q_proj: 8, "model.layers.0.mlp.down_proj": 4}
    assert record.rank == 4 and info.config.scaling_for(q_proj) == 8 / 8
    _, tensors = read_peft_adapter(store.objects / record.digest)
    assert tensors[f"base_model.model.{q_proj}.lora_A.weight"].shape == (8, 64)


def test_rank_pattern_that_disagrees_with_the_tensors_is_refused(store, adapter_factory):
    src = adapter_factory(config_overrides={"rank_pattern": {"q_proj": 8}})
    with pytest.raises(AdapterValidationError,
                       match=r"q_proj\.lora_A\.weight' has rank 4 but the config says r=8 "
                             r"\(rank_pattern\)"):
        store.add(src, "a")


def test_target_modules_given_as_a_regex_is_honoured(store, adapter_factory):
    # save_peft_adapter writes a regex when leaf names would select too much (PEFT: a string
    # target_modules is matched with re.fullmatch against the module path).
    both = r"^model\.layers\.0\.(mlp\.down_proj|self_attn\.q_proj)$"
    covered = adapter_factory(config_overrides={"target_modules": both})
    assert store.add(covered, "a").num_modules == 2
    partial = adapter_factory(config_overrides={"target_modules": r"^model\.layers\.0\.mlp\..*$"})
    with pytest.raises(AdapterValidationError, match="q_proj' is not covered by target_modules"):
        store.add(partial, "b")


def test_config_that_is_not_json_is_refused(store, adapter_factory):
    src = adapter_factory()
    (src / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterValidationError, match="adapter_config.json: not valid JSON"):
        store.add(src, "a")


def test_incomplete_triple_is_refused(store, adapter_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    src = adapter_factory()
    weights = src / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector"]
    save_file(tensors, str(weights))
    with pytest.raises(AdapterValidationError, match="down_proj.*lacks lora_magnitude_vector"):
        store.add(src, "a")


def test_unexpected_key_is_refused(store, adapter_factory):
    import torch
    from safetensors.torch import load_file, save_file

    src = adapter_factory()
    weights = src / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.model.embed_tokens.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(weights))
    with pytest.raises(AdapterValidationError, match="unexpected key.*embed_tokens"):
        store.add(src, "a")


def test_rank_that_disagrees_with_config_is_refused(store, adapter_factory):
    src = adapter_factory(rank=4, config_overrides={"r": 8})
    with pytest.raises(AdapterValidationError, match="config says r=8"):
        store.add(src, "a")


def test_module_outside_target_modules_is_refused(store, adapter_factory):
    src = adapter_factory(target_modules=["v_proj"])
    with pytest.raises(AdapterValidationError, match="not covered by target_modules"):
        store.add(src, "a")


def test_adapter_for_another_base_model_is_refused(home, adapter_factory):
    store = AdapterStore(home, base_model=BASE_MODEL)
    store.add(adapter_factory(), "ours")
    with pytest.raises(BaseModelMismatchError, match="meta-llama/Llama-3-8B"):
        store.add(adapter_factory(base_model="meta-llama/Llama-3-8B"), "theirs")
    assert [r.id for r in store.list()] == ["ours"]


def test_adapter_with_shapes_of_another_base_model_is_refused(home, adapter_factory):
    store = AdapterStore(home, expected_shapes={"self_attn.q_proj": (64, 64),
                                                "mlp.down_proj": (64, 64)})
    store.add(adapter_factory(features=64), "fits")
    with pytest.raises(BaseModelMismatchError, match=r"down_proj.*out=32, in=32.*out=64, in=64"):
        store.add(adapter_factory(features=32), "wrong_shape")


def test_adapter_declared_for_another_fingerprint_is_refused(home, adapter_factory):
    store = AdapterStore(home, base_model_fingerprint="aaaa1111")
    record = store.add(adapter_factory(), "ok", base_model_fingerprint="aaaa1111")
    assert record.base_model_fingerprint == "aaaa1111"
    with pytest.raises(BaseModelMismatchError, match="bbbb2222"):
        store.add(adapter_factory(), "other", base_model_fingerprint="bbbb2222")


def test_removing_an_unknown_adapter_names_it(store):
    with pytest.raises(AdapterNotFoundError, match="'ghost' is not in the store"):
        store.remove("ghost")


# ----------------------------------------------------------------------------- verify / manifest


def test_verify_reports_a_corrupted_stored_file(store, adapter_factory):
    store.add(adapter_factory(seed=1), "good")
    bad = store.add(adapter_factory(seed=2), "bad")
    weights = store.objects / bad.digest / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    results = {r.id: r for r in store.verify()}
    assert results["good"].ok and not results["good"].problems
    assert not results["bad"].ok
    assert "adapter_model.safetensors: sha256" in results["bad"].problems[0]


def test_verify_reports_a_missing_stored_file(store, adapter_factory):
    record = store.add(adapter_factory(), "a")
    (store.objects / record.digest / "adapter_config.json").unlink()
    (result,) = store.verify("a")
    assert not result.ok and "adapter_config.json: missing" in result.problems[0]


def test_corrupted_manifest_is_a_clear_error_and_is_left_untouched(home, adapter_factory):
    store = AdapterStore(home)
    record = store.add(adapter_factory(), "a")
    store.manifest_path.write_text('{"format": "r3mes-adapter-store", "adapt')
    garbage = store.manifest_path.read_bytes()
    with pytest.raises(ManifestCorruptError, match="manifest.json: corrupted"):
        AdapterStore(home)
    with pytest.raises(ManifestCorruptError):
        store.add(adapter_factory(), "b")
    with pytest.raises(ManifestCorruptError):
        store.remove("a")
    assert store.manifest_path.read_bytes() == garbage
    assert (store.objects / record.digest).is_dir(), "adapter data must not be lost"


def test_manifest_with_a_malformed_entry_is_refused(home, adapter_factory):
    store = AdapterStore(home)
    store.add(adapter_factory(), "a")
    data = json.loads(store.manifest_path.read_text())
    data["adapters"]["a"]["digest"] = "not-a-digest"
    store.manifest_path.write_text(json.dumps(data))
    with pytest.raises(ManifestCorruptError, match="entry 'a' is malformed"):
        store.list()


def test_touch_is_batched_and_flushed(store, adapter_factory):
    store.add(adapter_factory(), "a")
    store.touch("a", when=1e12, flush_after_s=3600)
    on_disk = json.loads(store.manifest_path.read_text())["adapters"]["a"]["last_used"]
    assert on_disk < 1e12, "a touch must not rewrite the manifest every time"
    assert store.get("a").last_used < 1e12 and store.list()[0].last_used == 1e12
    store.flush()
    assert json.loads(store.manifest_path.read_text())["adapters"]["a"]["last_used"] == 1e12


# ----------------------------------------------------------------------------- size limit


def test_size_limit_evicts_least_recently_used_unpinned_adapters(home, adapter_factory):
    store = AdapterStore(home)
    records = {name: store.add(adapter_factory(seed=i), name)
               for i, name in enumerate(["old", "pinned", "recent"])}
    size = records["old"].size_bytes
    store.set_pinned("pinned")
    store.touch("old", when=100.0)
    store.touch("pinned", when=50.0)
    store.touch("recent", when=300.0)
    store.set_max_size_gb(3.5 * size / 1024**3)  # room for three
    store.add(adapter_factory(seed=9), "newest")
    assert sorted(r.id for r in store.list()) == ["newest", "pinned", "recent"]
    assert store.last_evicted == ["old"]
    assert store.total_bytes() <= store.max_size_bytes
    assert len(list(store.objects.iterdir())) == 3


def test_lowering_the_limit_evicts_immediately_but_never_pinned(home, adapter_factory):
    store = AdapterStore(home)
    size = store.add(adapter_factory(seed=0), "a").size_bytes
    store.add(adapter_factory(seed=1), "b")
    store.set_pinned("b")
    evicted = store.set_max_size_gb(1.5 * size / 1024**3)
    assert evicted == ["a"] and [r.id for r in store.list()] == ["b"]
    assert AdapterStore(home).max_size_bytes == int(1.5 * size)


def test_store_full_of_pinned_adapters_refuses_a_new_one(home, adapter_factory):
    store = AdapterStore(home)
    size = store.add(adapter_factory(seed=0), "a", pinned=True).size_bytes
    store.set_max_size_gb(1.5 * size / 1024**3)
    with pytest.raises(StoreFullError, match="unpin or remove"):
        store.add(adapter_factory(seed=1), "b")
    assert [r.id for r in store.list()] == ["a"]
    assert len(list(store.objects.iterdir())) == 1


def test_adapter_larger_than_the_limit_is_refused(home, adapter_factory):
    store = AdapterStore(home, max_size_gb=1000 / 1024**3)
    with pytest.raises(StoreFullError, match="larger than the store limit"):
        store.add(adapter_factory(features=256), "big")
    assert store.list() == []


# ----------------------------------------------------------------------------- concurrency, crashes


def test_concurrent_adds_from_threads_all_land(store, adapter_factory):
    sources = [adapter_factory(seed=i) for i in range(6)]
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            store.add(sources[i], f"t{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [r.id for r in store.list()] == [f"t{i}" for i in range(6)]
    assert all(r.ok for r in store.verify())


_CRASH_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import r3mes.cache.adapter_store as s
    home, src, phase = sys.argv[1], sys.argv[2], sys.argv[3]
    if phase == "copy":
        original = s.copy_file_hashing
        def slow_copy(a, b):
            # copy a first part, then stall so the parent kills us mid-write
            with open(a, "rb") as fin, open(b, "wb") as fout:
                fout.write(fin.read(100))
                fout.flush()
            print("WRITING", flush=True)
            time.sleep(60)
            return original(a, b)
        s.copy_file_hashing = slow_copy
    else:  # "manifest": the object is in place, the manifest rename has not happened
        real_replace = s.os.replace
        def stalled_replace(a, b):
            if str(b).endswith("manifest.json"):
                print("WRITING", flush=True)
                time.sleep(60)
            return real_replace(a, b)
        s.os.replace = stalled_replace
        import r3mes.utils.atomic as atomic
        atomic.os.replace = stalled_replace
    s.AdapterStore(home).add(src, "crashed")
    """
)


@pytest.mark.parametrize("phase", ["copy", "manifest"])
def test_crash_during_import_leaves_the_store_consistent(home, adapter_factory, tmp_path, phase):
    store = AdapterStore(home)
    store.add(adapter_factory(seed=1), "survivor")
    manifest_before = store.manifest_path.read_bytes()
    src = adapter_factory(seed=2, features=256)
    script = tmp_path / "crash.py"
    script.write_text(_CRASH_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(home), str(src), phase],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "WRITING", proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    # The crash left debris (a staging dir or an unreferenced object + temp manifest) but the
    # store still reads as before: the manifest is intact and every listed adapter verifies.
    reopened = AdapterStore(home)
    assert reopened.manifest_path.read_bytes() == manifest_before
    assert [r.id for r in reopened.list()] == ["survivor"]
    assert all(r.ok for r in reopened.verify())
    debris = list(reopened.root.glob(".staging-*")) + [
        p for p in reopened.objects.iterdir() if p.name != reopened.get("survivor").digest]
    assert debris, "the simulated crash should have left something behind"

    # The next mutation cleans it up, and the same import then succeeds.
    reopened.add(src, "crashed")
    assert not list(reopened.root.glob(".staging-*"))
    assert not list(reopened.root.glob(".manifest.json.*.tmp"))
    assert sorted(p.name for p in reopened.objects.iterdir()) == sorted(
        r.digest for r in reopened.list())
    assert all(r.ok for r in reopened.verify())


def test_a_live_writers_staging_dir_is_not_cleaned_up(store, adapter_factory):
    staging = store.root / f".staging-{os.getpid()}-inprogress"
    staging.mkdir()
    store.add(adapter_factory(), "a")  # a mutation runs the orphan cleanup
    assert staging.is_dir()
    staging.rmdir()
