"""The artifact contract that export, the runtime, verify and the JavaScript runtime share.

- :mod:`~edgepeft.contract.names`: file names, graph input/output names, adapter names, base tags.
- :mod:`~edgepeft.contract.features`: how a kind's run-time feature is described (parts, shapes,
  identity values, mix rules); the kinds in :mod:`edgepeft.kinds` fill these in.
- :mod:`~edgepeft.contract.manifest`: reading and checking ``manifest.json``.
- :mod:`~edgepeft.contract.verify`: ``edgepeft verify``.

Everything here is torch-free and numpy-free at import time.
"""

from edgepeft.contract.features import MIX_RULES, Feature, Part
from edgepeft.contract.manifest import graph_entries, mixes, read_manifest, target_files, target_providers
from edgepeft.contract.names import (ADAPTER_NAME_RE, BASE_CONFIG, FORMAT, FORMAT_VERSION, LAYOUTS,
                                     MANIFEST_NAME, MAX_MANIFEST_BYTES, PROMPT_INPUT, UNTAGGED,
                                     base_tag, check_adapter_name, head_input_name, inside,
                                     past_names, prefix_names, present_names, rows_input_name, sha256_file, shared_input_name,
                                     slot_input_name, value_digest)
from edgepeft.contract.verify import verify

__all__ = ["ADAPTER_NAME_RE", "BASE_CONFIG", "FORMAT", "FORMAT_VERSION", "Feature", "Part", "LAYOUTS", "MANIFEST_NAME",
           "MAX_MANIFEST_BYTES", "MIX_RULES", "PROMPT_INPUT", "UNTAGGED", "base_tag", "check_adapter_name",
           "graph_entries", "head_input_name", "inside", "mixes", "past_names", "prefix_names",
           "present_names", "read_manifest", "rows_input_name", "sha256_file", "shared_input_name", "slot_input_name",
           "target_files", "target_providers", "value_digest", "verify"]
