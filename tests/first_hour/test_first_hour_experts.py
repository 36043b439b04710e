"""Issue 26, items 1, 2, 5 and 9: bundled experts stay with the demo model they were trained
for, never replace the user's adapters or settings, corrupted weights are refused, and the
demo model says it is a toy."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

from r3mes.cache import AdapterStore, adapter_digest
from r3mes.cli import main
from r3mes.serving.inference_pipeline import InferencePipeline, PipelineConfig, assets_dir

MEDICAL_TR = "Diyabet hastalarında insülin direnci nasıl tedavi edilir?"


def flip_byte_in_tensors(path: Path) -> None:
    """Invert one byte in the middle of a safetensors file's tensor data (not its header)."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    at = 8 + header + (len(data) - 8 - header) // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_demo_model_says_it_is_a_toy_once(tmp_path, capsys):
    assert main(["ask", MEDICAL_TR, "--home", str(tmp_path), "--no-rag", "--max-tokens",
                 "2"]) == 0
    assert capsys.readouterr().err.count("bundled demo model") == 1


def test_another_model_after_the_demo_skips_the_bundled_experts(tmp_path, tiny, capsys):
    home = str(tmp_path / "home")

    async def demo_start() -> None:  # what the demo's first run leaves: its experts
        demo = InferencePipeline(PipelineConfig(home=home, enable_rag=False,
                                                router_strategy="keyword"))
        await demo.initialize()
        await demo.close()

    asyncio.run(demo_start())
    assert "medical_dora" in {r.id for r in AdapterStore(home).list()}

    # Then a model of another shape: the bundled experts are skipped with one notice.
    rc = main(["ask", MEDICAL_TR, "--home", home, "--model", str(tiny["model"]), "--no-rag",
               "--max-tokens", "2", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    answer = json.loads(out.out)
    assert answer["success"] and answer["metrics"]["adapters_loaded"] == []
    (notice,) = [n for n in answer["notices"] if "do not fit" in n]
    assert "medical_dora" in notice and "made for another base model" in notice
    assert not any("bundled demo model" in n for n in answer["notices"])


async def test_bundled_experts_never_replace_a_users_adapter_or_limit(tmp_path, tiny):
    home = str(tmp_path / "home")
    mine = tiny["experts"] / "medical_dora"
    assert main(["adapters", "add", str(mine), "--id", "medical_dora", "--home", home]) == 0
    assert main(["adapters", "limit", "1", "--home", home]) == 0

    pipeline = InferencePipeline(PipelineConfig(home=home, enable_rag=False,
                                                router_strategy="keyword"))
    await pipeline.initialize()  # the demo model: installs the bundled experts
    await pipeline.close()

    store = AdapterStore(home)
    assert store.get("medical_dora").digest == adapter_digest(mine)
    assert store.max_size_bytes == 1024**3
    assert "coding_dora" in {r.id for r in store.list()}  # installed where nothing was
    # The user's adapter was made for the tiny model, not the demo: not routed to.
    assert "medical_dora" in pipeline.skipped_experts
    assert "medical_dora" not in pipeline.installed_experts


def test_flipped_model_weights_are_refused_on_load(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(assets_dir() / "demo_model", model)
    flip_byte_in_tensors(model / "model.r3mes.safetensors")

    rc = main(["ask", "hi", "--model", str(model), "--home", str(tmp_path / "home"),
               "--no-rag", "--json", "--max-tokens", "1"])
    assert rc == 2
    assert "sha256" in json.loads(capsys.readouterr().out)["error"]
    # `generate` checks too, without --verify
    assert main(["generate", "--model", str(model), "hi", "--json", "--max-tokens", "1"]) == 2
    assert "does not match" in json.loads(capsys.readouterr().out)["error"]
