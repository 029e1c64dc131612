/* Loading pgwfwd's XDP program with libxdp, and taking it off again.
 *
 * A run killed without cleaning up leaves its program attached. The next
 * start recognises it by name and replaces it; a program of anyone else is
 * left alone and reported, so that pgwfwd never silently takes over an
 * interface someone else filters.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <xdp/libxdp.h>

#include "../bpf/pgwfwd_shared.h"
#include "pgwfwd.h"

struct pgwfwd_xdp {
	struct xdp_program *program;
	enum xdp_attach_mode mode;
	int ifindex;
	int xskmap_fd;
	int counters_fd;
};

_Static_assert(XDP_CNT_MAX == PGWFWD_XDP_COUNTERS,
	       "XDP counters differ between bpf/ and csrc/");

static int library_verbosity;

/* libxdp and libbpf talk only when asked to (pgwfwd -v). */
static int library_print(enum libxdp_print_level level, const char *format,
			 va_list args)
{
	if (library_verbosity <= (int)level)
		return 0;
	return vfprintf(stderr, format, args);
}

static int libbpf_print(enum libbpf_print_level level, const char *format,
			va_list args)
{
	if (library_verbosity <= (int)level)
		return 0;
	return vfprintf(stderr, format, args);
}

void pgwfwd_set_library_verbosity(int verbosity)
{
	library_verbosity = verbosity;
	libxdp_set_print(library_print);
	libbpf_set_print(libbpf_print);
}

static void say(char *message, uint32_t size, const char *format, ...)
{
	va_list args;

	if (!message || !size)
		return;
	va_start(args, format);
	vsnprintf(message, size, format, args);
	va_end(args);
}

/* Take off a pgwfwd program left by an earlier run; refuse anyone else's. */
static int remove_stale(int ifindex, char *message, uint32_t size)
{
	struct xdp_multiprog *attached;
	struct xdp_program *program;
	const char *foreign = NULL;
	int err = 0;

	attached = xdp_multiprog__get_from_ifindex(ifindex);
	if (libxdp_get_error(attached))
		return 0;  /* nothing attached */

	if (xdp_multiprog__is_legacy(attached)) {
		program = xdp_multiprog__main_prog(attached);
		if (program && strcmp(xdp_program__name(program),
				      PGWFWD_XDP_PROG_NAME))
			foreign = xdp_program__name(program);
	} else {
		for (program = xdp_multiprog__next_prog(NULL, attached);
		     program;
		     program = xdp_multiprog__next_prog(program, attached))
			if (strcmp(xdp_program__name(program),
				   PGWFWD_XDP_PROG_NAME))
				foreign = xdp_program__name(program);
	}
	if (foreign) {
		say(message, size,
		    "interface already has XDP program %s attached", foreign);
		err = -EBUSY;
		goto out;
	}

	err = xdp_multiprog__detach(attached);
	if (err)
		say(message, size, "cannot remove the XDP program of an "
		    "earlier run: %s", strerror(-err));
	else
		say(message, size, "replaced the XDP program of an earlier run");
out:
	xdp_multiprog__close(attached);
	return err;
}

/* The settings are the only read-only data of the program; the verifier
 * then sees them as constants. */
static int set_settings(struct xdp_program *program, uint32_t vip,
			uint16_t gtp_port, uint32_t max_frame_len)
{
	struct pgwfwd_xdp_settings settings = {
		.vip = vip,
		.gtp_port = gtp_port,
		.max_frame_len = max_frame_len,
	};
	struct bpf_object *object = xdp_program__bpf_obj(program);
	struct bpf_map *map;
	size_t size;

	bpf_object__for_each_map(map, object) {
		const char *name = bpf_map__name(map);
		size_t length = strlen(name);

		if (length < 7 || strcmp(name + length - 7, ".rodata"))
			continue;
		if (!bpf_map__initial_value(map, &size) ||
		    size != sizeof(settings))
			return -EINVAL;
		return bpf_map__set_initial_value(map, &settings,
						  sizeof(settings));
	}
	return -ENOENT;
}

int pgwfwd_xdp_attach(struct pgwfwd_xdp **out, int ifindex,
		      const char *object_path, uint32_t vip, uint16_t gtp_port,
		      uint32_t max_frame_len, char *message,
		      uint32_t message_size)
{
	DECLARE_LIBXDP_OPTS(xdp_program_opts, opts,
			    .open_filename = object_path,
			    .prog_name = PGWFWD_XDP_PROG_NAME);
	struct bpf_object *object;
	struct pgwfwd_xdp *xdp;
	int err;

	xdp = calloc(1, sizeof(*xdp));
	if (!xdp)
		return -ENOMEM;
	xdp->ifindex = ifindex;

	/* Open and configure */
	xdp->program = xdp_program__create(&opts);
	err = libxdp_get_error(xdp->program);
	if (err) {
		say(message, message_size, "cannot open XDP object %s: %s",
		    object_path, strerror(-err));
		goto err_free;
	}
	err = set_settings(xdp->program, vip, gtp_port, max_frame_len);
	if (err) {
		say(message, message_size, "XDP object %s has no settings",
		    object_path);
		goto err_close;
	}

	/* Replace a stale program, then attach: native, else generic */
	err = remove_stale(ifindex, message, message_size);
	if (err)
		goto err_close;
	xdp->mode = XDP_MODE_NATIVE;
	err = xdp_program__attach(xdp->program, ifindex, xdp->mode, 0);
	if (err == -EOPNOTSUPP) {
		xdp->mode = XDP_MODE_SKB;
		err = xdp_program__attach(xdp->program, ifindex, xdp->mode, 0);
	}
	if (err) {
		say(message, message_size, "cannot attach XDP program: %s",
		    strerror(-err));
		goto err_close;
	}

	/* Maps */
	object = xdp_program__bpf_obj(xdp->program);
	xdp->xskmap_fd = bpf_object__find_map_fd_by_name(object, "xsks_map");
	xdp->counters_fd = bpf_object__find_map_fd_by_name(object,
							   "xdp_counters");
	if (xdp->xskmap_fd < 0 || xdp->counters_fd < 0) {
		err = -ENOENT;
		say(message, message_size, "XDP object %s lacks its maps",
		    object_path);
		goto err_detach;
	}

	*out = xdp;
	return 0;

err_detach:
	xdp_program__detach(xdp->program, ifindex, xdp->mode, 0);
err_close:
	xdp_program__close(xdp->program);
err_free:
	free(xdp);
	return err;
}

int pgwfwd_xdp_mode(const struct pgwfwd_xdp *xdp)
{
	return xdp->mode == XDP_MODE_NATIVE ? 1 : 0;
}

int pgwfwd_xdp_xskmap_fd(const struct pgwfwd_xdp *xdp)
{
	return xdp->xskmap_fd;
}

int pgwfwd_xdp_counters(const struct pgwfwd_xdp *xdp, uint64_t *counters)
{
	int n_cpus = libbpf_num_possible_cpus();
	uint64_t *per_cpu;
	uint32_t key;
	int cpu, err = 0;

	if (n_cpus <= 0)
		return n_cpus ? n_cpus : -EINVAL;
	per_cpu = calloc(n_cpus, sizeof(uint64_t));
	if (!per_cpu)
		return -ENOMEM;

	for (key = 0; key < PGWFWD_XDP_COUNTERS; key++) {
		if (bpf_map_lookup_elem(xdp->counters_fd, &key, per_cpu)) {
			err = -errno;
			break;
		}
		counters[key] = 0;
		for (cpu = 0; cpu < n_cpus; cpu++)
			counters[key] += per_cpu[cpu];
	}
	free(per_cpu);
	return err;
}

void pgwfwd_xdp_detach(struct pgwfwd_xdp *xdp)
{
	if (!xdp)
		return;
	xdp_program__detach(xdp->program, xdp->ifindex, xdp->mode, 0);
	xdp_program__close(xdp->program);
	free(xdp);
}
