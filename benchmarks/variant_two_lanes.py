"""A variant of a package copy for ``gpu_versions.py``: each GPU's units packed in two lanes (alternate units), each lane
on its own CUDA stream, so that one lane's Python runs while the other waits for the synchronisations inside
ModelOpt's functions (``profile_gpu.py --torch``: the pack thread, not the GPU, sets the pace).

    git archive HEAD offload_export | tar -x -C benchmarks/v_two && python benchmarks/variant_two_lanes.py benchmarks/v_two

Each lane keeps the whole read-ahead budget (twice the host memory bound): an experiment, not the package's way.
"""

import sys
from pathlib import Path

from variant_read_ahead import patch

REPLACEMENTS = [
    ("""    for unit in units:
        lanes.setdefault((lane or _fold_lane)(reader, unit), []).append(unit)
""", """    for i, unit in enumerate(units):
        key = (lane or _fold_lane)(reader, unit)
        if lane is None and isinstance(key, torch.device) and key.type == "cuda":
            key = (key, i % 2)
        lanes.setdefault(key, []).append(unit)
"""),
    ("""        if isinstance(device, torch.device) and device.type == "cuda":
            torch.cuda.set_device(device)  # kernels that allocate on the current device
""", """        if isinstance(device, tuple):
            torch.cuda.set_device(device[0])
            torch.cuda.set_stream(torch.cuda.Stream(device[0]))
        if isinstance(device, torch.device) and device.type == "cuda":
            torch.cuda.set_device(device)  # kernels that allocate on the current device
"""),
]


def main() -> None:
    path = Path(sys.argv[1]) / "offload_export" / "pipeline.py"
    for old, new in REPLACEMENTS:
        patch(path, old, new)


if __name__ == "__main__":
    main()
