"""The test suite: ``unit/`` runs in one process, ``distributed/`` launches ranks, ``workers/``
holds the functions and launchers those ranks import (``tests.workers.<module>``)."""
