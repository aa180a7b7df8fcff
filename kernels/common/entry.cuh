// Names of extern "C" entry points. The CPU emulator compiles the attention family twice
// (portable and sm_90a tile shapes) into one library; the second copy's entries carry a
// suffix. nvcc builds use the names unchanged.
#pragma once

#if defined(LONGCTX_EMU) && defined(LONGCTX_EMU_SM90)
#define LONGCTX_ENTRY_NAME(NAME) NAME##_emu_sm90
#else
#define LONGCTX_ENTRY_NAME(NAME) NAME
#endif
