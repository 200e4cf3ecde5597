"""The model registry: numbered versions, idempotent adds, tamper checks, deployments."""

from __future__ import annotations

from pathlib import Path

import pytest

from featurestore.errors import RegistryError
from featurestore.models import FeatureRef, ModelCard, ModelRegistry, Precision, parse_model_ref


def card(**changes: object) -> ModelCard:
    base = ModelCard(
        name="",
        version=0,
        kind="onnx",
        features=(FeatureRef("user_spend", "count_1d", "abc"),),
        label=None,
        content_hash="",
        created_at="",
        input_name="features",
        output_name="probabilities",
        output_index=1,
    )
    return ModelCard(**{**base.__dict__, **changes})  # type: ignore[arg-type]


def test_versions_are_numbered_and_the_same_bytes_are_one_version(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    first = registry.add("fraud", b"model-one", card())
    again = registry.add("fraud", b"model-one", card())
    second = registry.add("fraud", b"model-two", card())
    assert (first.version, again.version, second.version) == (1, 1, 2)
    assert first.ref == "fraud@1"
    assert registry.versions("fraud") == [1, 2]
    assert registry.card("fraud").version == 2  # the newest, while nothing is deployed
    registry.deploy("fraud", 1, precision=None, by="me")
    assert registry.card("fraud").version == 1  # the deployed one
    assert [d.version for d in registry.history("fraud")] == [1]
    deployment = registry.deploy("fraud", 2, precision=Precision.FP32, by="me")
    assert deployment.previous == 1
    assert registry.deployment("fraud") == deployment


def test_the_same_bytes_served_another_way_are_a_new_version(tmp_path: Path) -> None:
    """`tenx models add` again with --on-missing refuse returned the old version, with
    its old policy, and said nothing."""
    from featurestore.models import MissingPolicy

    registry = ModelRegistry(tmp_path)
    first = registry.add("fraud", b"model-one", card())
    refusing = registry.add("fraud", b"model-one", card(on_missing=MissingPolicy.REFUSE))
    assert refusing.version == 2
    assert refusing.on_missing is MissingPolicy.REFUSE
    assert registry.add("fraud", b"model-one", card(on_missing=MissingPolicy.REFUSE)).version == 2
    assert registry.add("fraud", b"model-one", card(output_index=0)).version == 3
    assert registry.card("fraud", first.version).on_missing is not MissingPolicy.REFUSE


def test_a_model_file_edited_by_hand_is_refused(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    registry.add("fraud", b"model-one", card())
    registry.model_path("fraud", 1).write_bytes(b"something else")
    with pytest.raises(RegistryError, match="does not match its card's content hash"):
        registry.card("fraud", 1)


def test_unknown_names_and_versions_say_what_exists(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    registry.add("fraud", b"m", card())
    with pytest.raises(RegistryError, match=r"no model `frod` in the registry at .* \(known: fraud\)"):
        registry.card("frod")
    with pytest.raises(RegistryError, match=r"model `fraud` has no version 7 \(versions: 1\)"):
        registry.card("fraud", 7)
    with pytest.raises(RegistryError, match="has no accepted fp16 variant: it was not made"):
        registry.deploy("fraud", 1, precision=Precision.FP16, by="me")


def test_model_references_and_names() -> None:
    assert parse_model_ref("fraud") == ("fraud", None)
    assert parse_model_ref("fraud@3") == ("fraud", 3)
    with pytest.raises(RegistryError, match=r"the version after @ must be a number, e\.g\. fraud@2"):
        parse_model_ref("fraud@latest")
    with pytest.raises(RegistryError, match="must start with a lowercase letter"):
        ModelRegistry(Path("/nonexistent")).add("Fraud", b"m", card())
