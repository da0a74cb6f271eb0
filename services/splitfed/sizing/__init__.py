"""How much memory a role needs, estimated from its settings before anything runs (`splitfed size`,
and `splitfed launch`'s check of the chart's limits).

Arithmetic, torch-free for the built-in models and data sets, so that a machine that only drives
the cluster can use it:
- `measured`: the measured constants (MiB per part, factors, uncertainties);
- `shapes`: the models described as shapes, and the halves a split cuts them into;
- `task_sizes`: the same shapes read with torch from what a task builds and a party's own data
  (imported only for a --task, own data or a torchvision model);
- `parts`: what an estimate is (phases of parts with bounds, the request and limit it suggests);
- `estimators`: one estimator per role, from its learning settings (the data sets' sample counts
  from `learning.settings.DATASETS`);
- `chart`: Kubernetes quantities, and the settings and limits the chart's values give each role.

A role that cannot be sized from here raises NotSized (not a ValueError: its settings may be
right). The estimate's low and high bounds come from each part's own uncertainty;
tests/integration/test_sizing.py runs the real roles and checks that their peaks lie within them.
"""

from splitfed.sizing.chart import check_fits, check_values, family_of, parse_quantity, read_in_pods, role_settings, values_key
from splitfed.sizing.parts import Estimate, Part, Phase, rounded_up
from splitfed.sizing.estimators import (
    GPU_ROLES, ROLE_NAMES, both_phases, estimate, estimate_from, evaluation_activations, gpu_activations, reads_with_torch, settings_class,
    share_fraction, sizes_model, training_activations,
)
from splitfed.sizing.measured import (
    CUDA_CONTEXT_MIB, DEFAULT_TORCH_BUILD, FLOAT32, GPU_ALLOCATOR_ROUNDING, INT64, INTERPRETER_MIB, LIMIT_MARGIN, MESSAGE_COPIES, MIB,
    OPTIMIZER_IMPORT_MIB, OPTIMIZER_STATE, OTHER_PHASE_RESIDUE, OWN_DATA_READ_BYTES, READER_IMPORT_MIB, ROUND_TO_MIB, RUNTIME_MIB,
    SKLEARN_IMPORT_MIB, TASK_DATA_READ_COPIES, TORCH_BUILDS, TORCH_IMPORT_MIB, TORCH_KERNELS_MIB, TRACKER_PEER_BYTES, TRACKER_REPORT_BYTES,
    TRAIN_ACTIVATION_FACTOR, UNCERTAINTY,
)
from splitfed.sizing.shapes import (
    DEFAULT_CUT, PLANS, TAIL_LAYERS, CannotSplit, Layer, NotSized, OwnData, Parts, Sized, cut_index, model_layers, parts_at, split_parts, walks,
)

__all__ = [
    "CUDA_CONTEXT_MIB", "DEFAULT_CUT", "DEFAULT_TORCH_BUILD", "FLOAT32", "GPU_ALLOCATOR_ROUNDING", "GPU_ROLES", "INT64", "INTERPRETER_MIB",
    "LIMIT_MARGIN", "MESSAGE_COPIES", "MIB", "OPTIMIZER_IMPORT_MIB", "OPTIMIZER_STATE", "OTHER_PHASE_RESIDUE", "OWN_DATA_READ_BYTES", "PLANS",
    "READER_IMPORT_MIB", "ROLE_NAMES", "ROUND_TO_MIB", "RUNTIME_MIB", "SKLEARN_IMPORT_MIB", "TAIL_LAYERS", "TASK_DATA_READ_COPIES",
    "TORCH_BUILDS", "TORCH_IMPORT_MIB", "TORCH_KERNELS_MIB", "TRACKER_PEER_BYTES", "TRACKER_REPORT_BYTES", "TRAIN_ACTIVATION_FACTOR",
    "UNCERTAINTY", "CannotSplit", "Estimate", "Layer", "NotSized", "OwnData", "Part", "Parts", "Phase", "Sized", "both_phases",
    "check_fits", "check_values", "cut_index", "estimate", "estimate_from", "evaluation_activations", "family_of", "gpu_activations",
    "model_layers", "parse_quantity", "parts_at", "read_in_pods", "reads_with_torch", "role_settings", "rounded_up", "settings_class", "share_fraction",
    "sizes_model", "split_parts", "training_activations", "values_key", "walks",
]
