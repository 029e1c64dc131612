/* Types shared by the XDP program and the loader in csrc/xdp.c. */
#ifndef PGWFWD_SHARED_H
#define PGWFWD_SHARED_H

/* Written into the program's read-only data before it is loaded, so the
 * verifier sees constants and the filter costs no map lookup. */
struct pgwfwd_xdp_settings {
	__u32 vip;       /* network byte order */
	__u16 gtp_port;  /* network byte order */
	__u16 reserved;
	__u32 max_frame_len;  /* longest frame an AF_XDP socket can take */
};

/* Indices of the per-CPU counter array; csrc/pgwfwd.h repeats them as
 * PGWFWD_XDP_* for Python, and the loader checks that both agree. */
enum pgwfwd_xdp_counter {
	XDP_CNT_REDIRECTED,
	XDP_CNT_PASSED,
	XDP_CNT_FRAGMENTS,
	XDP_CNT_NO_SOCKET,
	XDP_CNT_TOO_BIG,
	XDP_CNT_MAX,
};

#define PGWFWD_XDP_PROG_NAME "pgwfwd_xdp"

#endif
