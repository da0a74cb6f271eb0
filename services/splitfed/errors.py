"""Failures a user is told about in one line (the CLI maps each to an exit code). They live here,
torch-free, so that every command, the relay's included, can name them without importing torch."""

from __future__ import annotations


class DataError(RuntimeError):
    """A data set cannot be found or read; the message says where it looked."""


class TaskError(RuntimeError):
    """A task (--task, or the model and data the settings name) cannot be built or used: the
    message names the file and the function."""


class Refused(RuntimeError):
    """The FedAvg server refused this worker; the message says why."""


class RunAborted(RuntimeError):
    """The split-server ended this run (it restarted, or never knew it): the run cannot go on."""


class DeviceError(RuntimeError):
    """The device a party is asked to compute on is not on this machine: the message names it."""
