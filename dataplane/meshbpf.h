/*
 * The forwarded-traffic counters: an eBPF program on every interface's tc
 * egress hook (see meshbpf.c). Internal to libmeshdp: meshdp.c owns one
 * struct meshbpf per context and merges its counters into the usage dump.
 */
#ifndef MESHBPF_H
#define MESHBPF_H

#include <stddef.h>
#include <stdint.h>

#define MESHBPF_NAME_LEN 16 /* IFNAMSIZ */
#define MESHBPF_RAW 0x80000000u /* an interface id that is its ifindex | this */

/* One counter: packets that arrived on `in` and left on `out` for a
 * destination prefix (family 4 or 6; len 255 = no configured prefix, address
 * zero). Interfaces are ids of their names (the same name, the same id, as
 * nft keys by name), or their ifindex | MESHBPF_RAW until a sweep named
 * them. */
struct meshbpf_key {
	uint32_t in, out, family, len;
	unsigned char addr[16];
};

struct meshbpf_value {
	uint64_t packets, bytes; /* bytes: IP packet lengths, as nft counts them */
};

/* An element of the counters array (mmapped): the key is valid once its
 * family is set. Element 0 is the header: its packets are the next free
 * element. A cache line each, so that two CPUs counting two flows (a
 * transfer and its acks) do not fight over one line. */
struct meshbpf_slot {
	struct meshbpf_key key;
	struct meshbpf_value value;
	unsigned char pad[16];
};

struct meshbpf_link {
	uint32_t ifindex, id;
	int attached;	/* the counting program is on its egress hook */
	char name[MESHBPF_NAME_LEN];
};

struct meshbpf_name {
	uint32_t id;
	char name[MESHBPF_NAME_LEN];
};

struct meshbpf {
	int rt;		/* NETLINK_ROUTE socket in the context's namespace */
	uint32_t seq;
	int usage, index, lpm6, lpm4, ifids, names;	/* map fds, -1 until opened */
	int prog_eth, prog_l3;		/* program fds (ethernet / L3 devices) */
	struct meshbpf_slot *slots;	/* the usage array, mapped; NULL until opened */
	struct meshbpf_link *links;	/* as of the last sweep */
	size_t n_links, links_cap;
	struct meshbpf_name *names_of;	/* the names map's contents */
	size_t n_names, names_cap;
	uint32_t next_id;
};

void meshbpf_init(struct meshbpf *b);
void meshbpf_close(struct meshbpf *b);
/* Finds the maps of the state in this namespace (create == 0: -ENOENT if
 * there is none), or makes a new, empty state (create != 0) that replaces
 * any other; then attaches to every interface. The verifier's log goes to
 * log on a load failure. 0 or -errno. */
int meshbpf_open(struct meshbpf *b, int create, char *log, size_t log_len);
/* Refreshes the interface list; attaches to interfaces not attached yet
 * (force: to all again). 0 or -errno. */
int meshbpf_sweep(struct meshbpf *b, int force);
/* The name of an interface id; "" if unknown (a MESHBPF_RAW one gone before
 * it was named). */
void meshbpf_name(struct meshbpf *b, uint32_t id, char name[MESHBPF_NAME_LEN]);
/* Calls each() for every counter; stops at its first non-zero result. */
int meshbpf_read(const struct meshbpf *b,
		 int (*each)(void *arg, const struct meshbpf_key *, const struct meshbpf_value *),
		 void *arg);
/* Deletes the counters of interface `name` (in or out), or with name NULL
 * those whose prefix is no longer configured. The count, or -errno. */
int meshbpf_delete(struct meshbpf *b, const char *name);
/* A destination prefix: the network address (IPv4 in the first 4 bytes). */
struct meshbpf_prefix {
	uint32_t family, len;
	unsigned char addr[16];
};

/* Makes the tries hold exactly these prefixes (those that stay are never
 * absent meanwhile). 0 or -errno. */
int meshbpf_prefixes(struct meshbpf *b, const struct meshbpf_prefix *wanted, size_t n);

#endif
