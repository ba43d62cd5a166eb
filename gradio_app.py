"""torus-sparse Gradio demo: `.venv/bin/python gradio_app.py`, then open http://127.0.0.1:7860.

Options: --port, --host, --model, --vram-budget, --lookahead, --transport (see --help).
The page is built in `torus_adapters.apps.gradio_ui`.
"""

import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local demo does not phone home

from torus_adapters.apps.gradio_ui import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
