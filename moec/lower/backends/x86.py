"""x86-64 backend: AVX-512/AVX2 kernel schedules, int8-activation GEMVs with AVX-512 VNNI."""

from moec.lower.backends.base import Backend
from moec.lower.pipeline import CPU_PHASES
from moec.lower.schedules import x86

BACKEND = Backend("x86", CPU_PHASES, x86)
