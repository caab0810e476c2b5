#!/bin/bash
# Lease call 1 (carry .lease/c1): keep the GGUF's first half and install the wheels outside the repository; both
# stay while the machine is warm (30 s between calls).
mkdir -p /tmp/stash && cp .lease/c1/gguf.part00 /tmp/stash/ &&
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .lease/c1/whl/*.whl &&
PYTHONPATH=/tmp/site python3 -c "import transformers, peft, torch; print(transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
