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
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from hybridmim.resources import RESOURCES


class SpecError(ValueError):
    """A job spec does not match its schema; the message names the key path."""


@cache  # the registry asks again on every reference it resolves
def _retrieve(uri: str) -> Resource:
    # The schemas refer to each other by file name (e.g. backbone.schema.yaml#/$defs/rate);
    # without a base URI that name is what the registry is asked for.
    contents = yaml.safe_load((RESOURCES / uri).read_text())
    # Every file is draft 2020-12; without its "$schema" a referenced file is checked by our
    # validator class (tuples as arrays), not by the stock one jsonschema picks for the dialect.
    contents.pop("$schema", None)
    return Resource.from_contents(contents, default_specification=DRAFT202012)


# Python callers (the registry's overrides, a backbone dict) may pass tuples where YAML gives lists.
_Validator = validators.extend(Draft202012Validator, type_checker=(
    Draft202012Validator.TYPE_CHECKER.redefine("array", lambda _, v: isinstance(v, (list, tuple)))))


@cache
def validator(schema: str) -> Draft202012Validator:
    """The validator of a schema shipped in hybridmim/resources (links to workflow/schemas/ in a
    checkout): a file's stem, e.g. "pretrain_spec", or a part of one, "config#/definitions/x"."""
    stem, _, pointer = schema.partition("#")
    return _Validator({"$ref": f"{stem}.schema.yaml#{pointer}"},
                      registry=Registry(retrieve=_retrieve))


def _dotted(path: Iterable[Any]) -> str:
    """["data", "datasets", 0, "name"] -> "data.datasets[0].name"."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def schema_problem(instance: Any, schema: str, prefix: str = "") -> str | None:
    """What is wrong with ``instance`` under the named schema, key path (after ``prefix``) first,
    then the key's description where the schema has one; None if it is valid."""
    failure = best_match(validator(schema).iter_errors(instance))
    if failure is None:
        return None
    where = _dotted([prefix, *failure.absolute_path] if prefix else failure.absolute_path)
    if failure.validator == "required":
        missing = [f"{where}.{key}" if where else key for key in failure.validator_value
                   if key not in failure.instance]
        return f"missing {missing}"
    # A key's description says what it should be; a whole block's would only be long.
    about = failure.schema.get("description", "").strip().rstrip(".")
    message = f"{failure.message} ({about})" if about and failure.absolute_path else failure.message
    return f"{where}: {message}" if where else message


def check_spec(spec: Any, stage: str, error: type[Exception] = SpecError) -> None:
    """Raise ``error`` naming the key path if ``spec`` does not match its stage's schema."""
    problem = schema_problem(spec, f"{stage}_spec")
    if problem:
        raise error(f"{stage} spec: {problem}. Build the spec with `hybridmim spec {stage} ...` "
                    f"from a validated config (its keys: "
                    f"workflow/schemas/{stage}_spec.schema.yaml)")


def _defaults(node: dict[str, Any]) -> dict[str, Any]:
    return {key: _defaults(sub) if "properties" in sub else sub["default"]
            for key, sub in node.get("properties", {}).items() if "default" in sub}


def config_defaults(definition: str) -> dict[str, Any]:
    """The values the config schema fills into the absent keys of a block (its
    ``definitions.<definition>``, nested blocks included), for code that resolves such a block
    outside a validated config: the config schema stays the one place defaults are written."""
    definitions = _retrieve("config.schema.yaml").contents["definitions"]
    return copy.deepcopy(_defaults(definitions[definition]))
