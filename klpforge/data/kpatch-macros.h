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

#include <linux/compiler.h>
#include <linux/kernel.h>
#include <linux/printk.h>
#include <linux/livepatch.h>
#include <linux/version.h>

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
 * module carries), so it adds no data that the diff engine would have to refuse.
 */
#define KPATCH_PRINTK(_fmt, ...) printk(_fmt, ##__VA_ARGS__)

/* System calls ------------------------------------------------------------------------------ */
/*
 * SYSCALL_DEFINEn also emits syscall metadata and error-injection entries (global data a live
 * patch may not change).  KPATCH_SYSCALL_DEFINEn emits only the code: on x86_64 with the
 * pt_regs syscall wrappers (arch/x86/include/asm/syscall_wrapper.h, Linux 6.1) that is
 * __x64_sys_<name> (and __ia32_sys_<name> with IA32_EMULATION), __se_sys_<name> and
 * __do_sys_<name>, the same symbols the running kernel has.
 */
#include <linux/syscalls.h>

#if defined(CONFIG_X86_64) && defined(CONFIG_ARCH_HAS_SYSCALL_WRAPPER)

#define __KLPFORGE_SYS_STUB(abi, x, name, ...)						\
	long __##abi##_sys##name(const struct pt_regs *regs);				\
	long __##abi##_sys##name(const struct pt_regs *regs)				\
	{										\
		return __se_sys##name(__VA_ARGS__);					\
	}

#ifdef CONFIG_IA32_EMULATION
#define __KLPFORGE_IA32_STUB(x, name, ...)						\
	__KLPFORGE_SYS_STUB(ia32, x, name, SC_IA32_REGS_TO_ARGS(x, __VA_ARGS__))
#else
#define __KLPFORGE_IA32_STUB(x, name, ...)
#endif

#define __KPATCH_SYSCALL_DEFINEx(x, name, ...)						\
	static long __se_sys##name(__MAP(x, __SC_LONG, __VA_ARGS__));			\
	static inline long __do_sys##name(__MAP(x, __SC_DECL, __VA_ARGS__));		\
	__KLPFORGE_SYS_STUB(x64, x, name, SC_X86_64_REGS_TO_ARGS(x, __VA_ARGS__))	\
	__KLPFORGE_IA32_STUB(x, name, __VA_ARGS__)					\
	static long __se_sys##name(__MAP(x, __SC_LONG, __VA_ARGS__))			\
	{										\
		long ret = __do_sys##name(__MAP(x, __SC_CAST, __VA_ARGS__));		\
		__MAP(x, __SC_TEST, __VA_ARGS__);					\
		__PROTECT(x, ret, __MAP(x, __SC_ARGS, __VA_ARGS__));			\
		return ret;								\
	}										\
	static inline long __do_sys##name(__MAP(x, __SC_DECL, __VA_ARGS__))

#else	/* other architectures: the generic definition minus the metadata */

#define __KPATCH_SYSCALL_DEFINEx(x, name, ...) __SYSCALL_DEFINEx(x, name, __VA_ARGS__)

#endif

#define KPATCH_SYSCALL_DEFINE1(name, ...) __KPATCH_SYSCALL_DEFINEx(1, _##name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE2(name, ...) __KPATCH_SYSCALL_DEFINEx(2, _##name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE3(name, ...) __KPATCH_SYSCALL_DEFINEx(3, _##name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE4(name, ...) __KPATCH_SYSCALL_DEFINEx(4, _##name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE5(name, ...) __KPATCH_SYSCALL_DEFINEx(5, _##name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE6(name, ...) __KPATCH_SYSCALL_DEFINEx(6, _##name, __VA_ARGS__)

#endif /* KLPFORGE_KPATCH_MACROS_H */
