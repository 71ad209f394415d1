"""Runs a chain of compiled graphs. Imports no other `btp` package at import time (`Pipeline.load` brings in
`btp.artifact` and `btp.backends`): an app that only runs engines needs neither tracing nor model code."""

from .chain import ChainSpec, Engine, StageLayout
from .errors import ArtifactError, BtpError, BuildError, DataError, DependencyError, InputError, ModelError, PlanError
from .pipeline import GenerateOutput, Inputs, Pipeline, Prefill, TextStream

__all__ = [
    "ArtifactError", "BtpError", "BuildError", "ChainSpec", "DataError", "DependencyError", "Engine", "GenerateOutput",
    "InputError", "Inputs", "ModelError", "Pipeline", "Prefill", "PlanError", "StageLayout", "TextStream",
]
