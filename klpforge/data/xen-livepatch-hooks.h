/*
 * klpforge: hooks for Xen livepatch payloads (Xen 4.17), the Xen counterpart of kpatch-macros.h.
 *
 *   #include "xen-livepatch-hooks.h"
 *   static void my_load(void) { printk("loaded\n"); }
 *   KLP_XEN_LOAD_HOOK(my_load);
 *
 * Each macro puts a pointer in the section Xen's payload loader reads (xen/common/livepatch.c,
 * prepare_payload): .livepatch.hooks.{load,unload} hold arrays of void (*)(void), called after upload
 * and before unload; .livepatch.hooks.{preapply,apply,postapply,prerevert,revert,postrevert} hold one
 * pointer each, taking the payload. An apply/revert hook REPLACES Xen's own patching of the functions
 * (it must call arch code itself); pre hooks may veto by returning non-zero. klpforge adds this file's
 * directory with -I when it compiles the original and the patched objects.
 */
#ifndef KLPFORGE_XEN_LIVEPATCH_HOOKS_H
#define KLPFORGE_XEN_LIVEPATCH_HOOKS_H

#include <xen/livepatch_payload.h>

#define KLP_XEN_HOOK_(sec, type, fn) \
    type *const __attribute__((used, section(sec))) klp_xen_hook_##fn = fn

#define KLP_XEN_LOAD_HOOK(fn)       KLP_XEN_HOOK_(".livepatch.hooks.load", livepatch_loadcall_t, fn)
#define KLP_XEN_UNLOAD_HOOK(fn)     KLP_XEN_HOOK_(".livepatch.hooks.unload", livepatch_unloadcall_t, fn)
#define KLP_XEN_PREAPPLY_HOOK(fn)   KLP_XEN_HOOK_(".livepatch.hooks.preapply", livepatch_precall_t, fn)
#define KLP_XEN_APPLY_HOOK(fn)      KLP_XEN_HOOK_(".livepatch.hooks.apply", livepatch_actioncall_t, fn)
#define KLP_XEN_POSTAPPLY_HOOK(fn)  KLP_XEN_HOOK_(".livepatch.hooks.postapply", livepatch_postcall_t, fn)
#define KLP_XEN_PREREVERT_HOOK(fn)  KLP_XEN_HOOK_(".livepatch.hooks.prerevert", livepatch_precall_t, fn)
#define KLP_XEN_REVERT_HOOK(fn)     KLP_XEN_HOOK_(".livepatch.hooks.revert", livepatch_actioncall_t, fn)
#define KLP_XEN_POSTREVERT_HOOK(fn) KLP_XEN_HOOK_(".livepatch.hooks.postrevert", livepatch_postcall_t, fn)

#endif
