/* SPDX-License-Identifier: GPL-2.0 */
/* bindgen on this file prints the libclang version (Kbuild, preflight). */
#pragma message("clang version " __clang_version__)
