"""Adapters after an artifact has shipped (``edgepeft adapter ...``).

- :mod:`~edgepeft.lifecycle.add`: convert a PEFT adapter against an existing side-branch graph
  (no graph export, no base folder: the module tree from the config the artifact recorded).
- :mod:`~edgepeft.lifecycle.edit`: remove, list and the atomic manifest edit they share (numpy
  only: the runtime install has them).
"""
