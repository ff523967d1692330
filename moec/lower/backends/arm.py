"""AArch64 backend: NEON kernel schedules (``sdot`` int8-activation GEMVs where the CPU has dotprod)."""

from moec.lower.backends.base import Backend
from moec.lower.pipeline import CPU_PHASES
from moec.lower.schedules import arm

BACKEND = Backend("arm", CPU_PHASES, arm)
