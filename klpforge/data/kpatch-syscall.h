/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * kpatch-syscall.h -- KPATCH_SYSCALL_DEFINE1..6 for patches written for kpatch-build, so that a
 * patch to a system call builds unchanged with `klpforge build`.  Written for klpforge from the
 * kernel's own syscall wrappers (include/linux/syscalls.h and arch/<arch>/include/asm/
 * syscall_wrapper.h, Linux 6.1).
 *
 * Why the macros exist.  SYSCALL_DEFINEn(name, ...) expands to three functions: the entry the
 * syscall table points at (__x64_sys_<name> on x86_64, __arm64_sys_<name>, sys_<name> ...), a
 * sign-extension step __se_sys_<name>, and the body __do_sys_<name>, which is `static inline` --
 * and the kernel's `inline` implies `notrace`.  When GCC keeps the body out of line, a change to
 * it is a change to a function without an ftrace entry, which cannot be live patched.
 *
 * What they do.  KPATCH_SYSCALL_DEFINEn is SYSCALL_DEFINEn with the body renamed to
 * __kpatch_do_sys_<name>: for the diff that is a *new* function (carried in the patch whatever its
 * attributes), the sign-extension step is inlined as before, and the only replaced function is the
 * entry, which has an ftrace entry.  They emit no syscall metadata (CONFIG_FTRACE_SYSCALLS tables):
 * the running kernel keeps its own.
 *
 * Usage: replace SYSCALL_DEFINEn( with KPATCH_SYSCALL_DEFINEn( in the patched file and
 * #include "kpatch-syscall.h" (or "kpatch-macros.h", which includes this header).
 */
#ifndef KLPFORGE_KPATCH_SYSCALL_H
#define KLPFORGE_KPATCH_SYSCALL_H

#ifdef __XEN__
#error "kpatch-syscall.h is for Linux live patches; a Xen payload uses klpforge's xen-livepatch-hooks.h (KLP_XEN_LOAD_HOOK and the other hooks): docs/xen.md"
#else /* the rest only for Linux: nothing more is compiled for Xen, so the line above is the only error */

#include <linux/syscalls.h>
#include "kpatch-macros.h"

/* The renamed body: a new function for the diff, where the kernel's is __do_sys<name>. */
#define __KLPF_SYS_BODY(name)	__kpatch_do_sys##name

/* __se_sys<name>: sign-extend the register-sized arguments, call the body, keep the tail call out. */
#define __KLPF_SYS_SE(x, name, ...)							\
	static long __se_sys##name(__MAP(x, __SC_LONG, __VA_ARGS__))			\
	{										\
		long ret = __KLPF_SYS_BODY(name)(__MAP(x, __SC_CAST, __VA_ARGS__));	\
		__MAP(x, __SC_TEST, __VA_ARGS__);					\
		__PROTECT(x, ret, __MAP(x, __SC_ARGS, __VA_ARGS__));			\
		return ret;								\
	}

#define __KLPF_SYS_DECLS(x, name, ...)							\
	static long __se_sys##name(__MAP(x, __SC_LONG, __VA_ARGS__));			\
	static inline long __KLPF_SYS_BODY(name)(__MAP(x, __SC_DECL, __VA_ARGS__))

/* An entry taking struct pt_regs: the form every architecture with a syscall wrapper uses. */
#define __KLPF_SYS_REGS_ENTRY(entry, name, regs_to_args)				\
	long entry(const struct pt_regs *regs);						\
	ALLOW_ERROR_INJECTION(entry, ERRNO);						\
	long entry(const struct pt_regs *regs)						\
	{										\
		return __se_sys##name(regs_to_args);					\
	}

#if defined(CONFIG_X86_64) && defined(CONFIG_ARCH_HAS_SYSCALL_WRAPPER)
/*
 * x86_64 (arch/x86/include/asm/syscall_wrapper.h, 5.7 and later): __x64_sys<name>, and
 * __ia32_sys<name> with CONFIG_IA32_EMULATION, each built by the kernel's own stub macros, so the
 * entries are the ones the running kernel has.
 */
#define __KPATCH_SYSCALL_DEFINEx(x, name, ...)						\
	__KLPF_SYS_DECLS(x, name, __VA_ARGS__);						\
	__X64_SYS_STUBx(x, name, __VA_ARGS__)						\
	__IA32_SYS_STUBx(x, name, __VA_ARGS__)						\
	__KLPF_SYS_SE(x, name, __VA_ARGS__)						\
	static inline long __KLPF_SYS_BODY(name)(__MAP(x, __SC_DECL, __VA_ARGS__))

#elif defined(CONFIG_ARM64)
/* arm64 (arch/arm64/include/asm/syscall_wrapper.h): __arm64_sys<name>(regs). */
#define __KPATCH_SYSCALL_DEFINEx(x, name, ...)						\
	__KLPF_SYS_DECLS(x, name, __VA_ARGS__);						\
	__KLPF_SYS_REGS_ENTRY(__arm64_sys##name, name,				\
					 SC_ARM64_REGS_TO_ARGS(x, __VA_ARGS__))		\
	__KLPF_SYS_SE(x, name, __VA_ARGS__)						\
	static inline long __KLPF_SYS_BODY(name)(__MAP(x, __SC_DECL, __VA_ARGS__))

#elif defined(CONFIG_PPC64) && defined(CONFIG_ARCH_HAS_SYSCALL_WRAPPER)
/* powerpc with the pt_regs wrapper (6.1 without SPU_BASE/COMPAT): sys<name>(regs). */
#define __KPATCH_SYSCALL_DEFINEx(x, name, ...)						\
	__KLPF_SYS_DECLS(x, name, __VA_ARGS__);						\
	__KLPF_SYS_REGS_ENTRY(sys##name, name, SC_POWERPC_REGS_TO_ARGS(x, __VA_ARGS__))	\
	__KLPF_SYS_SE(x, name, __VA_ARGS__)						\
	static inline long __KLPF_SYS_BODY(name)(__MAP(x, __SC_DECL, __VA_ARGS__))

#elif defined(CONFIG_S390)
/*
 * s390 (6.1 form): __s390x_sys<name> is an alias of __se_sys<name>, which takes the registers;
 * with CONFIG_COMPAT a 31-bit entry __s390_sys<name> calls the body directly.
 */
#ifdef CONFIG_COMPAT
#define __KLPF_S390_COMPAT(x, name, ...)						\
	long __s390_sys##name(struct pt_regs *regs);					\
	ALLOW_ERROR_INJECTION(__s390_sys##name, ERRNO);					\
	long __s390_sys##name(struct pt_regs *regs)					\
	{										\
		long ret = __KLPF_SYS_BODY(name)(SYSCALL_PT_ARGS(x, regs,		\
			__SC_COMPAT_CAST, __MAP(x, __SC_TYPE, __VA_ARGS__)));		\
		__MAP(x, __SC_TEST, __VA_ARGS__);					\
		return ret;								\
	}
#else
#define __KLPF_S390_COMPAT(x, name, ...)
#endif
#define __KPATCH_SYSCALL_DEFINEx(x, name, ...)						\
	__diag_push();									\
	__diag_ignore(GCC, 8, "-Wattribute-alias",					\
		      "Type aliasing is used to sanitize syscall arguments");		\
	long __s390x_sys##name(struct pt_regs *regs)					\
		__attribute__((alias(__stringify(__se_sys##name))));			\
	ALLOW_ERROR_INJECTION(__s390x_sys##name, ERRNO);				\
	static inline long __KLPF_SYS_BODY(name)(__MAP(x, __SC_DECL, __VA_ARGS__));	\
	long __se_sys##name(struct pt_regs *regs);					\
	__KLPF_S390_COMPAT(x, name, __VA_ARGS__)					\
	long __se_sys##name(struct pt_regs *regs)					\
	{										\
		long ret = __KLPF_SYS_BODY(name)(SYSCALL_PT_ARGS(x, regs,		\
			__SC_CAST, __MAP(x, __SC_TYPE, __VA_ARGS__)));			\
		__MAP(x, __SC_TEST, __VA_ARGS__);					\
		return ret;								\
	}										\
	__diag_pop();									\
	static inline long __KLPF_SYS_BODY(name)(__MAP(x, __SC_DECL, __VA_ARGS__))

#else
/*
 * Every other architecture (include/linux/syscalls.h): sys<name> is a global alias of
 * __se_sys<name>, which takes the arguments in registers.
 */
#define __KPATCH_SYSCALL_DEFINEx(x, name, ...)						\
	__diag_push();									\
	__diag_ignore(GCC, 8, "-Wattribute-alias",					\
		      "Type aliasing is used to sanitize syscall arguments");		\
	asmlinkage long sys##name(__MAP(x, __SC_DECL, __VA_ARGS__))			\
		__attribute__((alias(__stringify(__se_sys##name))));			\
	ALLOW_ERROR_INJECTION(sys##name, ERRNO);					\
	static inline long __KLPF_SYS_BODY(name)(__MAP(x, __SC_DECL, __VA_ARGS__));	\
	asmlinkage long __se_sys##name(__MAP(x, __SC_LONG, __VA_ARGS__));		\
	asmlinkage long __se_sys##name(__MAP(x, __SC_LONG, __VA_ARGS__))		\
	{										\
		long ret = __KLPF_SYS_BODY(name)(__MAP(x, __SC_CAST, __VA_ARGS__));	\
		__MAP(x, __SC_TEST, __VA_ARGS__);					\
		__PROTECT(x, ret, __MAP(x, __SC_ARGS, __VA_ARGS__));			\
		return ret;								\
	}										\
	__diag_pop();									\
	static inline long __KLPF_SYS_BODY(name)(__MAP(x, __SC_DECL, __VA_ARGS__))

#endif

#define KPATCH_SYSCALL_DEFINE1(name, ...) __KPATCH_SYSCALL_DEFINEx(1, _##name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE2(name, ...) __KPATCH_SYSCALL_DEFINEx(2, _##name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE3(name, ...) __KPATCH_SYSCALL_DEFINEx(3, _##name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE4(name, ...) __KPATCH_SYSCALL_DEFINEx(4, _##name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE5(name, ...) __KPATCH_SYSCALL_DEFINEx(5, _##name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE6(name, ...) __KPATCH_SYSCALL_DEFINEx(6, _##name, __VA_ARGS__)

#endif /* !__XEN__ */
#endif /* KLPFORGE_KPATCH_SYSCALL_H */
