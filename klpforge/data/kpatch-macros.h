/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * kpatch-macros.h -- klpforge's implementation of the macros that patches written for
 * kpatch-build use, so such patches build unchanged with `klpforge build`.
 *
 * Written for klpforge from the kernel's livepatch API (include/linux/livepatch.h,
 * Documentation/livepatch/{callbacks,shadow-vars}.rst, Linux 6.1); klpforge puts this
 * directory on the include path of the patched objects, so `#include "kpatch-macros.h"`
 * finds it.
 *
 * Callbacks: each KPATCH_*_CALLBACK(fn) records a 16-byte descriptor {fn, objname} in a
 * section named .kpatch.callbacks.<kind>, the layout kpatch's tooling reads; klpforge's diff
 * engine turns the descriptors into klp_object.callbacks of the object the patched file belongs
 * to.  Callbacks receive the struct klp_object being (un)patched; a pre-patch callback returning
 * non-zero aborts patching of that object.
 *
 * Shadow variables: use the kernel's klp_shadow_get(), klp_shadow_alloc(),
 * klp_shadow_get_or_alloc(), klp_shadow_free() and klp_shadow_free_all() directly (this header
 * includes <linux/livepatch.h>).
 */
#ifndef KLPFORGE_KPATCH_MACROS_H
#define KLPFORGE_KPATCH_MACROS_H

#ifdef __XEN__
#error "kpatch-macros.h is for Linux live patches; a Xen payload uses klpforge's xen-livepatch-hooks.h (KLP_XEN_LOAD_HOOK and the other hooks): docs/xen.md"
#else /* the rest only for Linux: nothing more is compiled for Xen, so the line above is the only error */

#include <linux/compiler.h>
#include <linux/kernel.h>
#include <linux/printk.h>
#include <linux/livepatch.h>
#include <linux/version.h>
#include <linux/jiffies.h>

/* Callback descriptors -------------------------------------------------------------------- */

typedef int (*klpforge_pre_cb_t)(struct klp_object *obj);
typedef void (*klpforge_void_cb_t)(struct klp_object *obj);

struct kpatch_pre_patch_callback {
	klpforge_pre_cb_t fn;
	const char *objname;	/* NULL: the object this file is linked into */
};

struct kpatch_post_patch_callback {
	klpforge_void_cb_t fn;
	const char *objname;
};

struct kpatch_pre_unpatch_callback {
	klpforge_void_cb_t fn;
	const char *objname;
};

struct kpatch_post_unpatch_callback {
	klpforge_void_cb_t fn;
	const char *objname;
};

/*
 * The "__kpatch_cb_check_*" pointer makes the compiler reject a callback of the wrong type;
 * it is a static inline-only pointer and leaves no data behind.
 */
#define __KLPFORGE_CALLBACK(kind, type, _fn)						\
	static inline type __maybe_unused __kpatch_cb_check_##kind(void) { return _fn; }	\
	static struct kpatch_##kind##_callback kpatch_##kind##_data			\
	__section(".kpatch.callbacks." #kind) __used = {				\
		.fn = _fn,								\
		.objname = NULL,							\
	}

#define KPATCH_PRE_PATCH_CALLBACK(_fn)							\
	__KLPFORGE_CALLBACK(pre_patch, klpforge_pre_cb_t, _fn)
#define KPATCH_POST_PATCH_CALLBACK(_fn)							\
	__KLPFORGE_CALLBACK(post_patch, klpforge_void_cb_t, _fn)
#define KPATCH_PRE_UNPATCH_CALLBACK(_fn)						\
	__KLPFORGE_CALLBACK(pre_unpatch, klpforge_void_cb_t, _fn)
#define KPATCH_POST_UNPATCH_CALLBACK(_fn)						\
	__KLPFORGE_CALLBACK(post_unpatch, klpforge_void_cb_t, _fn)

/* Load/unload hooks of the old kpatch core map onto post-patch / pre-unpatch callbacks. */
#define KPATCH_LOAD_HOOK(_fn)								\
	static void __kpatch_load_hook_##_fn(struct klp_object *obj) { _fn(); }		\
	KPATCH_POST_PATCH_CALLBACK(__kpatch_load_hook_##_fn)
#define KPATCH_UNLOAD_HOOK(_fn)								\
	static void __kpatch_unload_hook_##_fn(struct klp_object *obj) { _fn(); }	\
	KPATCH_PRE_UNPATCH_CALLBACK(__kpatch_unload_hook_##_fn)

/* Markers the diff engine honours ---------------------------------------------------------- */

/* Leave function/section/data out of the live patch even though it changed. */
#define KPATCH_IGNORE_SECTION(_sec)							\
	static char *__UNIQUE_ID(kpatch_ignore_section_) __used				\
	__section(".kpatch.ignore.sections") = _sec;
#define KPATCH_IGNORE_FUNCTION(_fn)							\
	static void *__kpatch_ignore_func_##_fn __used					\
	__section(".kpatch.ignore.functions") = _fn;
#define KPATCH_IGNORE_STATIC(_static)							\
	static char *__UNIQUE_ID(kpatch_ignore_static_) __used				\
	__section(".kpatch.ignore.data") = _static;

/* Patch the function without the consistency-model safety checks (use with care). */
#define KPATCH_FORCE_UNSAFE(_fn)							\
	static void *__kpatch_force_func_##_fn __used					\
	__section(".kpatch.force") = _fn;

/*
 * KPATCH_PRINTK: printk from patched code.  The format stays a string literal (rodata the patch
 * module carries), so it adds no data that the diff engine would have to refuse; see
 * KPATCH_PRINTK_DEFERRED below for why the call sits behind a branch.
 */
#define KPATCH_PRINTK(_fmt, ...)							\
	({ if (READ_ONCE(jiffies)) printk(_fmt, ##__VA_ARGS__); })

/*
 * KPATCH_PRINTK_DEFERRED: printk_deferred() from patched code, for contexts that hold the runqueue
 * lock.  Both printk forms sit behind a branch on jiffies that the compiler cannot drop, so the
 * __cold attribute of printk does not make the surrounding path cold (which could move or uninline
 * unchanged code and grow the patch).
 */
#define KPATCH_PRINTK_DEFERRED(_fmt, ...)						\
	({ if (READ_ONCE(jiffies)) printk_deferred(_fmt, ##__VA_ARGS__); })

/*
 * KPATCH_STATIC_CALL(name): call through the static call key's current target instead of a static
 * call site -- for a key that lives in a module, whose call sites in a live patch cannot be set up
 * (the module's klp relocations are written after its static calls are initialised, Linux 6.1).
 */
#include <linux/static_call.h>
#define KPATCH_STATIC_CALL(name)							\
	((typeof(&STATIC_CALL_TRAMP(name)))static_call_query(name))

/* KPATCH_SYSCALL_DEFINE1..6 live in kpatch-syscall.h, as in kpatch; either header brings both. */
#include "kpatch-syscall.h"

#endif /* !__XEN__ */
#endif /* KLPFORGE_KPATCH_MACROS_H */
