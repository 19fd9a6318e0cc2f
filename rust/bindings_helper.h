/* SPDX-License-Identifier: GPL-2.0 */
/* What dm-qcow2's own bindgen run sees; see Kbuild. */
#include <linux/device-mapper.h>
#include <linux/eventfd.h>
#include <linux/zlib.h>
#include "shim.h"
