// Stand-in for the CUDA runtime header in the emulated translation units (tests/cuda_emu/cuda_emu.h).
#pragma once
#include "../cuda_emu_runtime.h"
