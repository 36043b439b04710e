"""create_backend: the one place a backend is chosen by name."""

from __future__ import annotations

import typing

import pytest

from r3mes import kernels
from r3mes.config import InferenceSection
from r3mes.core.backends import (
    BACKEND_NAMES,
    BitNetCppBackend,
    PyTorchBackend,
    UnknownBackendError,
    create_backend,
)


def test_an_unknown_name_is_refused_naming_the_known_ones():
    with pytest.raises(UnknownBackendError,
                       match=r"unknown backend 'llama'.*auto, pytorch or bitnet_cpp") as info:
        create_backend("llama")
    assert isinstance(info.value, ValueError)


def test_the_names_are_the_configurations():
    assert typing.get_args(InferenceSection.model_fields["backend"].annotation) == BACKEND_NAMES


def test_pytorch_is_the_reference_whatever_the_device():
    assert type(create_backend("pytorch")) is PyTorchBackend
    assert type(create_backend("pytorch", device="cuda")) is PyTorchBackend


@pytest.mark.skipif(not kernels.available(), reason="needs the native module")
def test_auto_takes_the_native_kernels_when_asked_for_what_only_they_have():
    assert type(create_backend("auto")) is BitNetCppBackend
    exact = create_backend("auto", adapter_storage="fp32")
    assert type(exact) is BitNetCppBackend and exact.adapter_storage == "fp32"
    assert type(create_backend("bitnet_cpp")) is BitNetCppBackend
    with pytest.raises(ValueError, match="adapter_storage"):
        create_backend("bitnet_cpp", adapter_storage="int3")


def test_the_pipeline_reports_an_unknown_backend_as_its_own_error(tmp_path):
    import asyncio

    from r3mes.serving import PipelineConfig, PipelineError
    from r3mes.serving.inference_pipeline import InferencePipeline, assets_dir

    if not (assets_dir() / "demo_model").is_dir():
        pytest.skip("the bundled demo model is not installed")
    pipe = InferencePipeline(PipelineConfig(backend="llama", home=str(tmp_path),
                                            enable_rag=False, router_strategy="keyword"))

    async def load() -> None:
        try:
            await pipe.load_model()
        finally:
            await pipe.close()
    with pytest.raises(PipelineError, match="unknown backend 'llama'"):
        asyncio.run(load())
