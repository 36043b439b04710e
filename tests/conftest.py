"""Shared test fixtures: an isolated data directory for every test session, every SIMD level
the CPU runs, PEFT adapters on disk."""

from __future__ import annotations

import os

import pytest


def _supported_simd_levels() -> list[str]:
    from r3mes import kernels

    return list(kernels.info()["supported_simd_levels"]) if kernels.available() else []


@pytest.fixture(params=_supported_simd_levels())
def simd_level(request: pytest.FixtureRequest):
    """Each SIMD level this CPU runs, forced for the test (the kernels' level restored after)."""
    from r3mes import kernels

    before = kernels.simd_level()
    kernels.set_simd_level(request.param)
    yield request.param
    kernels.set_simd_level(before)


@pytest.fixture(autouse=True, scope="session")
def _isolated_r3mes_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Tests never touch the user's ~/.r3mes.
    os.environ["R3MES_HOME"] = str(tmp_path_factory.mktemp("r3mes_home"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def write_random_adapters(tmp_path_factory: pytest.TempPathFactory):
    """``write(model_dir, b_std) -> {"alpha": dir, "beta": dir}``: two PEFT DoRA adapters
    (rank 4, alpha 8) on every projection of the model in ``model_dir``, with B drawn from
    N(0, b_std) and magnitudes scaled by up to 30%, saved in PEFT's format."""

    def write(model_dir, b_std: float) -> dict:
        import torch

        from r3mes.core.adapter_io import save_peft_adapter
        from r3mes.core.checkpoint import load_model
        from r3mes.core.dora import dora_modules

        model, _ = load_model(model_dir)
        out = {}
        for i, name in enumerate(("alpha", "beta")):
            torch.manual_seed(100 + i)
            for mod in dora_modules(model).values():
                mod.add_adapter(name, rank=4, alpha=8.0)
                with torch.no_grad():
                    mod.lora_B[name].normal_(0, b_std)
                    mod.lora_magnitude_vector[name].mul_(1.0 + 0.3 * torch.rand_like(
                        mod.lora_magnitude_vector[name]))
            out[name] = save_peft_adapter(model, name, tmp_path_factory.mktemp("ad") / name)
        return out

    return write
