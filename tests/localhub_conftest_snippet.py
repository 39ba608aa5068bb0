"""What to put at the very top of ``tests/conftest.py`` to run every test against the local Hub.

Copy the two statements below above every other import in ``tests/conftest.py`` (in
particular above ``from helpers import ...``, which imports transformers and so
huggingface_hub). Importing the plugin module sets ``HF_ENDPOINT`` (a free loopback
port), ``HF_TOKEN``, a temporary ``HF_HOME``, ``HF_HUB_DISABLE_TELEMETRY=1``,
``HF_HUB_DISABLE_XET=1`` and unsets ``HF_HUB_OFFLINE`` *before* any client reads them;
``pytest_plugins`` then registers its fixtures:

* ``local_hub_env`` -- endpoint, port, token, hf_home the clients use;
* ``local_hub`` -- a session-wide server at that endpoint (``.endpoint``, ``.token``,
  ``.data_dir``, ``.api()``).

Tests then call ``HfApi()``, ``hf_hub_download``, ``from_pretrained``, ``push_to_hub``
without any endpoint argument. Without these lines the plugin still works (test modules
list it in their own ``pytest_plugins``), but it has to re-point an already imported
``huggingface_hub`` in place, which is less robust than setting the environment first.

This file is documentation; pytest does not collect it.
"""

from hubmerge.localhub.pytest_plugin import LOCAL_HUB_ENV  # noqa: F401  (configures the clients on import)

pytest_plugins = ["hubmerge.localhub.pytest_plugin"]
