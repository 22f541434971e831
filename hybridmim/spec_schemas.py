"""Job specs checked against their JSON schemas (workflow/schemas/<stage>_spec.schema.yaml).

hybridmim.config builds every spec fully resolved from a validated config, so these schemas only
check: they fill nothing in, and a spec's content (hence its hash) is what the builder wrote. A
failed check names the key path. Checks between keys that a schema cannot express stay with the
stage that needs them.
"""
from __future__ import annotations

import copy
from functools import cache
from typing import Any, Iterable

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource

from hybridmim.resources import CONFIG_SCHEMA, RESOURCES

STAGES = ("pretrain", "finetune", "evaluate")


class SpecError(ValueError):
    """A job spec does not match its schema; the message names the key path."""


def schema_path(name: str):
    """A schema shipped in hybridmim/resources (a link to workflow/schemas/ in a checkout)."""
    return RESOURCES / f"{name}.schema.yaml"


def _load(path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@cache  # the registry asks again on every reference it resolves
def _retrieve(uri: str) -> Resource:
    # The spec schemas refer to each other by file name (e.g. backbone.schema.yaml#/$defs/rate);
    # without a base URI that name is what the registry is asked for.
    return Resource.from_contents(_load(RESOURCES / uri))


@cache
def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(_load(schema_path(name)), registry=Registry(retrieve=_retrieve))


def _dotted(path: Iterable[Any]) -> str:
    """["data", "datasets", 0, "name"] -> "data.datasets[0].name"."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def schema_problem(instance: Any, schema: str, prefix: str = "") -> str | None:
    """What is wrong with ``instance`` under the named schema, key path (after ``prefix``) first,
    with the key's description where the schema has one; None if it is valid."""
    failure = best_match(validator(schema).iter_errors(instance))
    if failure is None:
        return None
    where = _dotted([prefix, *failure.absolute_path] if prefix else failure.absolute_path)
    if failure.validator == "required":
        missing = [f"{where}.{key}" if where else key for key in failure.validator_value
                   if key not in failure.instance]
        return f"missing {missing}"
    about = failure.schema.get("description", "").strip().rstrip(".")
    message = f"{failure.message} ({about})" if about else failure.message
    return f"{where}: {message}" if where else message


def check_spec(spec: Any, stage: str, error: type[Exception] = SpecError) -> None:
    """Raise ``error`` naming the key path if ``spec`` does not match its stage's schema."""
    problem = schema_problem(spec, f"{stage}_spec")
    if problem:
        raise error(f"{stage} spec: {problem}. Build the spec with `hybridmim spec {stage} ...` "
                    f"from a validated config (its keys: workflow/schemas/{stage}_spec.schema.yaml)")


@cache
def _config_definitions() -> dict[str, Any]:
    return _load(CONFIG_SCHEMA)["definitions"]


def _defaults(node: dict[str, Any]) -> dict[str, Any]:
    return {key: _defaults(sub) if "properties" in sub else sub["default"]
            for key, sub in node.get("properties", {}).items() if "default" in sub}


def config_defaults(definition: str) -> dict[str, Any]:
    """The values the config schema fills into the absent keys of a block (its
    ``definitions.<definition>``, nested blocks included), for code that resolves such a block
    outside a validated config: the config schema stays the one place defaults are written."""
    return copy.deepcopy(_defaults(_config_definitions()[definition]))
