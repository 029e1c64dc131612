// SPDX-License-Identifier: GPL-2.0
/* Passes everything. A veth end only takes frames that its peer sends with
 * XDP_TX when it runs an XDP program (or GRO) itself: the socket-based
 * forwarders get this one on their end, so that every system under test
 * receives the generator's frames through the same path. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int bench_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
