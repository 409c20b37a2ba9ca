"""Recipe files: YAML mappings of `TrainConfig` fields, as `keras-xbm train --config FILE` reads them."""

import dataclasses
import os

import yaml


def read_config_file(path, config_class):
    """Read a YAML recipe file and return its settings as a dictionary of `config_class` fields.

    Keys are the field names of `config_class` (the long command-line flags
    with underscores: `memory_size`, `learning_rate`, ...). Numbers that
    YAML 1.1 reads as strings, such as `1e-4` without a dot, are converted
    for float fields; lists become tuples.

    Args:
        path: the YAML file.
        config_class: the dataclass whose fields the keys must name
            (`keras_xbm.training.TrainConfig`).

    Raises:
        FileNotFoundError: when `path` does not exist.
        ValueError: for invalid YAML, a document that is not a mapping, an
            unknown key, or a float field whose value is not a number.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file not found: {path!r}. Expected a YAML file such as configs/sop.yaml.")
    with open(path, encoding="utf-8") as handle:
        try:
            settings = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: invalid YAML: {error}") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a mapping of setting names to values, found a {type(settings).__name__}.")

    fields = {field.name: field for field in dataclasses.fields(config_class)}
    unknown = sorted(str(key) for key in settings if key not in fields)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}: expected names among {', '.join(sorted(fields))}.")
    result = {}
    for key, value in settings.items():
        if fields[key].type is float and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{path}: {key} = {value!r} is not a number.") from None
        if isinstance(value, list):
            value = tuple(value)
        result[key] = value
    return result
