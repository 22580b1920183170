/*
 * Forwarded-traffic counters in eBPF (no clang, no libbpf: the program is a
 * hand-assembled instruction array, loaded and attached with raw syscalls
 * and rtnetlink).
 *
 * A tc clsact egress classifier on every interface sees each packet after
 * the netfilter forward hook (forwarding policy, enforcement) let it through
 * and before the qdisc: what nft's `forward` chain at priority filter + 10
 * saw. It always returns TC_ACT_UNSPEC, so it never changes forwarding.
 * Locally originated packets (skb->skb_iif 0) are left to nftables. The
 * destination is found by longest match in two LPM tries (IPv6, IPv4) whose
 * values are the configured prefix itself, so a counter's key carries the
 * prefix as nft's usage keys do; a miss counts under length 255 ("other").
 *
 * Counters are keyed (arrival interface, departure interface, prefix), an
 * interface by the id of its name (an array ifindex -> id, which each sweep
 * of the interfaces keeps up to date): a tunnel made anew under its name
 * counts on in the same elements, as nft's name keys did. They live
 * in an mmappable array, each element with its key, so a snapshot is a read
 * of memory: BPF_MAP_LOOKUP_BATCH of a hash costs ~0.35 us per element here
 * (18-23 ms for 50,050), too close to the 20 ms a snapshot may take. A hash
 * (the index) maps a key to its element; a key's first packet takes the
 * next free element (an atomic fetch-and-add on the header's counter),
 * writes the key, inserts it in the index, and then sets the key's family,
 * which makes the element visible to readers. Elements are never reused:
 * deleting a counter removes it from the index and hides its element. Once
 * a new key found none left (the header's counter went past SLOTS), the
 * state is spent: reads fail with ENOSPC and finding it fails, so the
 * caller makes a new one (a new epoch) rather than count less than nft did.
 *
 * Where this counts differently from nft's forward hook: IPv4 packets
 * without DF that the kernel fragments after `forward` count as their
 * fragments, and so do IPv6 fragments (conntrack reassembles them before
 * nft's hooks, the kernel fragments them again before this one), so a
 * router's own packets that leave in fragments count more at the neighbor
 * forwarding them than at the router, whose nft output hook sees them
 * whole (the mesh's own nested tunnels are sized never to fragment:
 * NESTED_MTU in services/common/wireguard.py); packets dropped between the two hooks (no neighbour answer)
 * count only in nft; interfaces of other link types (GRE, sit, ...) are not
 * counted; a packet passing two egress hooks counts on both when the lower
 * device is neither a port of its master nor given a VLAN tag (macvlan,
 * ipvlan). Tunnels are wireguard-go's tun devices: their encrypted packets
 * are new, the router's own (ingress 0). Whether kernel WireGuard's keep the
 * forwarded packet's arrival interface (they would count again, out of the
 * uplink) is not verified (this kernel has no WireGuard).
 *
 * Everything stays in the kernel: the filters hold the programs, which hold
 * the maps. The one on lo (always ifindex 1, never deleted) anchors the
 * state for the namespace's lifetime; a new process finds it there (filter
 * dump -> program id -> its map ids), and loads its own programs over the
 * same maps. The names map (id -> name) outlives the interfaces, so a gone
 * interface's counts keep their name.
 */
#define _GNU_SOURCE
#include "meshbpf.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <linux/bpf.h>
#include <linux/if_arp.h>
#include <linux/if_ether.h>
#include <linux/netlink.h>
#include <linux/pkt_cls.h>
#include <linux/pkt_sched.h>
#include <linux/rtnetlink.h>

/* Our filters' name; a state of another layout is not ours (a new one is
 * made, under a new epoch). */
#define TAG "meshdp-usage-4"
#define PRIO 0x6d64		/* our filters' priority on every egress hook */
#define LOOPBACK 1		/* lo's ifindex in every namespace */
#define SLOTS (1u << 17)	/* counter elements (8 MiB, allocated up front) */
#define PREFIXES_MAX 65536
#define NAMES_MAX 65536
#define IFIDS 65536		/* ifindexes below this have a name id (others: raw) */
#define RECV_LEN 65536
#define ANCHOR_TRIES 5	/* looks for the program on lo, replaced meanwhile */
#define LOAD_TRIES 5	/* program loads, interrupted by a signal */
#define NAME_TRIES 5	/* ids for a new name, taken by another opener meanwhile */
#define OTHER_LEN 255

struct lpm_key {
	uint32_t prefixlen;
	unsigned char addr[16];
};

/* An LPM value: the matching prefix, as the counter key carries it. */
struct prefix {
	uint32_t len;
	unsigned char addr[16];
};

static long sys_bpf(enum bpf_cmd cmd, union bpf_attr *attr)
{
	return syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

static int map_create(uint32_t type, uint32_t key, uint32_t value, uint32_t max,
		      uint32_t flags, const char *name)
{
	union bpf_attr a;
	int fd;

	memset(&a, 0, sizeof(a));
	a.map_type = type;
	a.key_size = key;
	a.value_size = value;
	a.max_entries = max;
	a.map_flags = flags;
	strncpy(a.map_name, name, sizeof(a.map_name) - 1);
	fd = (int)sys_bpf(BPF_MAP_CREATE, &a);
	return fd < 0 ? -errno : fd;
}

/* -- the program ------------------------------------------------------------- */

#define INSN(c, d, s, o, i) \
	((struct bpf_insn){ .code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i) })
#define MOV_REG(d, s) INSN(BPF_ALU64 | BPF_MOV | BPF_X, d, s, 0, 0)
#define MOV_IMM(d, i) INSN(BPF_ALU64 | BPF_MOV | BPF_K, d, 0, 0, i)
#define ADD_IMM(d, i) INSN(BPF_ALU64 | BPF_ADD | BPF_K, d, 0, 0, i)
#define LDX(size, d, s, o) INSN(BPF_LDX | (size) | BPF_MEM, d, s, o, 0)
#define STX(size, d, s, o) INSN(BPF_STX | (size) | BPF_MEM, d, s, o, 0)
#define ST(size, d, o, i) INSN(BPF_ST | (size) | BPF_MEM, d, 0, o, i)
#define ATOMIC_ADD(d, s, o) INSN(BPF_STX | BPF_DW | BPF_ATOMIC, d, s, o, BPF_ADD)
#define FETCH_ADD(d, s, o) INSN(BPF_STX | BPF_DW | BPF_ATOMIC, d, s, o, BPF_ADD | BPF_FETCH)
#define XCHG32(d, s, o) INSN(BPF_STX | BPF_W | BPF_ATOMIC, d, s, o, BPF_XCHG)
#define JGE(d, i) INSN(BPF_JMP | BPF_JGE | BPF_K, d, 0, 0, i)
#define JEQ(d, i) INSN(BPF_JMP | BPF_JEQ | BPF_K, d, 0, 0, i)
#define JNE(d, i) INSN(BPF_JMP | BPF_JNE | BPF_K, d, 0, 0, i)
#define JA INSN(BPF_JMP | BPF_JA, 0, 0, 0, 0)
#define CALL(f) INSN(BPF_JMP | BPF_CALL, 0, 0, 0, f)
#define EXIT INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0)
#define CTX(field) ((int16_t)offsetof(struct __sk_buff, field))

enum { L_IN_RAW, L_IN_DONE, L_OUT_RAW, L_OUT_DONE, L_V6, L_LOOKUP, L_COUNT, L_SLOT, L_ADD,
       L_NEW, L_RACE, L_OUT, N_LABELS };

struct program {
	struct bpf_insn insn[160];
	int n, label[N_LABELS], n_fix;
	struct { int at, label; } fix[32];
};

static void emit(struct program *p, struct bpf_insn insn)
{
	p->insn[p->n++] = insn;
}

/* A jump whose offset is filled in once `label` is placed. */
static void jump(struct program *p, struct bpf_insn insn, int label)
{
	p->fix[p->n_fix].at = p->n;
	p->fix[p->n_fix++].label = label;
	emit(p, insn);
}

static void place(struct program *p, int label)
{
	p->label[label] = p->n;
}

static void load_map(struct program *p, int reg, int fd)
{
	emit(p, INSN(BPF_LD | BPF_DW | BPF_IMM, reg, BPF_PSEUDO_MAP_FD, 0, fd));
	emit(p, INSN(0, 0, 0, 0, 0));
}

/* r0 = the value of the key at fp+key in map fd; a miss jumps to `missing`. */
static void lookup(struct program *p, int fd, int key, int missing)
{
	load_map(p, BPF_REG_1, fd);
	emit(p, MOV_REG(BPF_REG_2, BPF_REG_10));
	emit(p, ADD_IMM(BPF_REG_2, key));
	emit(p, CALL(BPF_FUNC_map_lookup_elem));
	jump(p, JEQ(BPF_REG_0, 0), missing);
}

/* Stores the interface id of the ifindex in r2 at fp+off (uses r8). */
static void interface_id(struct program *p, const struct meshbpf *b, int off, int raw, int done)
{
	emit(p, MOV_REG(BPF_REG_8, BPF_REG_2));
	emit(p, STX(BPF_W, BPF_REG_10, BPF_REG_2, -40));
	lookup(p, b->ifids, -40, raw);
	emit(p, LDX(BPF_W, BPF_REG_1, BPF_REG_0, 0));
	jump(p, JEQ(BPF_REG_1, 0), raw);
	emit(p, STX(BPF_W, BPF_REG_10, BPF_REG_1, off));
	jump(p, JA, done);
	place(p, raw); /* not named yet: its ifindex stands in */
	emit(p, INSN(BPF_ALU | BPF_OR | BPF_K, BPF_REG_8, 0, 0, (int32_t)MESHBPF_RAW));
	emit(p, STX(BPF_W, BPF_REG_10, BPF_REG_8, off));
	place(p, done);
}


/* Looks the key (fp-32) up in the index: its element's index to fp-40, or
 * a jump to `missing`. */
static void find_element(struct program *p, const struct meshbpf *b, int missing)
{
	lookup(p, b->index, -32, missing);
	emit(p, LDX(BPF_W, BPF_REG_1, BPF_REG_0, 0));
	emit(p, STX(BPF_W, BPF_REG_10, BPF_REG_1, -40));
}

/* Sets the key's family, copies the destination address (at `offset` in the
 * IP header) into the LPM lookup key with the family's full length, and
 * puts the family's trie in r1; a packet too short goes out uncounted. */
static void destination(struct program *p, int hdr, int family, int offset, int lpm)
{
	int size = family == 6 ? 16 : 4;

	emit(p, ST(BPF_W, BPF_REG_10, -24, family));
	emit(p, ST(BPF_W, BPF_REG_10, -56, size * 8));
	emit(p, MOV_REG(BPF_REG_1, BPF_REG_6));
	emit(p, MOV_IMM(BPF_REG_2, hdr + offset));
	emit(p, MOV_REG(BPF_REG_3, BPF_REG_10));
	emit(p, ADD_IMM(BPF_REG_3, -52));
	emit(p, MOV_IMM(BPF_REG_4, size));
	emit(p, CALL(BPF_FUNC_skb_load_bytes));
	jump(p, JNE(BPF_REG_0, 0), L_OUT);
	load_map(p, BPF_REG_1, lpm);
}

/*
 * The stack: key (struct meshbpf_key) at fp-32; the LPM lookup key at fp-56
 * (20 bytes), whose room an element index (fp-40) reuses later. r6 = skb,
 * r7 = the packet's IP length, r8 = a new element's index, r9 = its
 * address. hdr: the link header's length on this device at egress
 * (skb->len counts it, nft's counters do not).
 */
static void assemble(struct program *p, const struct meshbpf *b, int hdr)
{
	int i;

	emit(p, MOV_REG(BPF_REG_6, BPF_REG_1));
	/* Tagged by a VLAN device on its way here: counted at that device. */
	emit(p, LDX(BPF_W, BPF_REG_2, BPF_REG_6, CTX(vlan_present)));
	jump(p, JNE(BPF_REG_2, 0), L_OUT);
	emit(p, LDX(BPF_W, BPF_REG_2, BPF_REG_6, CTX(ingress_ifindex)));
	jump(p, JEQ(BPF_REG_2, 0), L_OUT); /* our own: nft counts it */
	interface_id(p, b, -32, L_IN_RAW, L_IN_DONE);
	emit(p, LDX(BPF_W, BPF_REG_2, BPF_REG_6, CTX(ifindex)));
	interface_id(p, b, -28, L_OUT_RAW, L_OUT_DONE);
	emit(p, LDX(BPF_W, BPF_REG_7, BPF_REG_6, CTX(len)));
	emit(p, ADD_IMM(BPF_REG_7, -hdr));
	emit(p, ST(BPF_W, BPF_REG_10, -20, OTHER_LEN));
	emit(p, ST(BPF_DW, BPF_REG_10, -16, 0));
	emit(p, ST(BPF_DW, BPF_REG_10, -8, 0));
	emit(p, LDX(BPF_W, BPF_REG_2, BPF_REG_6, CTX(protocol)));
	jump(p, JEQ(BPF_REG_2, htons(ETH_P_IPV6)), L_V6);
	jump(p, JNE(BPF_REG_2, htons(ETH_P_IP)), L_OUT);

	/* IPv4: the destination address is at 16 in the header. */
	destination(p, hdr, 4, 16, b->lpm4);
	jump(p, JA, L_LOOKUP);

	/* IPv6: at 24. */
	place(p, L_V6);
	destination(p, hdr, 6, 24, b->lpm6);

	place(p, L_LOOKUP);
	emit(p, MOV_REG(BPF_REG_2, BPF_REG_10));
	emit(p, ADD_IMM(BPF_REG_2, -56));
	emit(p, CALL(BPF_FUNC_map_lookup_elem));
	jump(p, JEQ(BPF_REG_0, 0), L_COUNT); /* no configured prefix: other */
	for (i = 0; i < 20; i += 4) { /* the prefix into the key */
		emit(p, LDX(BPF_W, BPF_REG_1, BPF_REG_0, i));
		emit(p, STX(BPF_W, BPF_REG_10, BPF_REG_1, -20 + i));
	}

	place(p, L_COUNT);
	find_element(p, b, L_NEW);
	place(p, L_SLOT);
	lookup(p, b->usage, -40, L_OUT);
	place(p, L_ADD);
	emit(p, MOV_IMM(BPF_REG_1, 1));
	emit(p, ATOMIC_ADD(BPF_REG_0, BPF_REG_1, offsetof(struct meshbpf_slot, value.packets)));
	emit(p, ATOMIC_ADD(BPF_REG_0, BPF_REG_7, offsetof(struct meshbpf_slot, value.bytes)));
	jump(p, JA, L_OUT);

	/* A new key: take the next element (full: not counted). */
	place(p, L_NEW);
	emit(p, ST(BPF_W, BPF_REG_10, -40, 0));
	lookup(p, b->usage, -40, L_OUT);
	emit(p, MOV_IMM(BPF_REG_8, 1));
	emit(p, FETCH_ADD(BPF_REG_0, BPF_REG_8, offsetof(struct meshbpf_slot, value.packets)));
	jump(p, JGE(BPF_REG_8, SLOTS), L_OUT);
	emit(p, STX(BPF_W, BPF_REG_10, BPF_REG_8, -40));
	lookup(p, b->usage, -40, L_OUT);
	emit(p, MOV_REG(BPF_REG_9, BPF_REG_0));
	for (i = 0; i < (int)sizeof(struct meshbpf_key); i += 4) {
		if (i == offsetof(struct meshbpf_key, family))
			continue; /* last: it publishes the element */
		emit(p, LDX(BPF_W, BPF_REG_1, BPF_REG_10, -32 + i));
		emit(p, STX(BPF_W, BPF_REG_9, BPF_REG_1, i));
	}
	load_map(p, BPF_REG_1, b->index);
	emit(p, MOV_REG(BPF_REG_2, BPF_REG_10));
	emit(p, ADD_IMM(BPF_REG_2, -32));
	emit(p, MOV_REG(BPF_REG_3, BPF_REG_10));
	emit(p, ADD_IMM(BPF_REG_3, -40));
	emit(p, MOV_IMM(BPF_REG_4, BPF_NOEXIST));
	emit(p, CALL(BPF_FUNC_map_update_elem));
	jump(p, JNE(BPF_REG_0, 0), L_RACE);
	/* An atomic store: the key's other fields are visible before it. */
	emit(p, LDX(BPF_W, BPF_REG_1, BPF_REG_10, -32 + (int)offsetof(struct meshbpf_key, family)));
	emit(p, XCHG32(BPF_REG_9, BPF_REG_1, offsetof(struct meshbpf_key, family)));
	emit(p, MOV_REG(BPF_REG_0, BPF_REG_9));
	jump(p, JA, L_ADD);

	/* Another CPU indexed the same key first: count in its element (ours
	 * stays hidden, unused). */
	place(p, L_RACE);
	find_element(p, b, L_OUT);
	jump(p, JA, L_SLOT);

	place(p, L_OUT);
	emit(p, MOV_IMM(BPF_REG_0, TC_ACT_UNSPEC));
	emit(p, EXIT);

	for (i = 0; i < p->n_fix; i++)
		p->insn[p->fix[i].at].off = (int16_t)(p->label[p->fix[i].label] - p->fix[i].at - 1);
}

static int prog_load(const struct meshbpf *b, int hdr, const char *name, char *log,
		     size_t log_len)
{
	struct program p;
	union bpf_attr a;
	int fd, saved, tries;

	memset(&p, 0, sizeof(p));
	assemble(&p, b, hdr);
	memset(&a, 0, sizeof(a));
	a.prog_type = BPF_PROG_TYPE_SCHED_CLS;
	a.insns = (uintptr_t)p.insn;
	a.insn_cnt = (uint32_t)p.n;
	a.license = (uintptr_t)"GPL";
	strncpy(a.prog_name, name, sizeof(a.prog_name) - 1);
	/* The verifier gives up with EAGAIN when a signal interrupts it. */
	for (tries = 0; tries < LOAD_TRIES; tries++) {
		fd = (int)sys_bpf(BPF_PROG_LOAD, &a);
		if (fd >= 0)
			return fd;
		if (errno != EAGAIN)
			break;
	}
	saved = errno;
	if (log && log_len) { /* again, for the verifier's reasons */
		log[0] = 0;
		a.log_buf = (uintptr_t)log;
		a.log_size = (uint32_t)log_len;
		a.log_level = 1;
		fd = (int)sys_bpf(BPF_PROG_LOAD, &a);
		if (fd >= 0)
			return fd;
	}
	return -saved;
}

/* -- rtnetlink ---------------------------------------------------------------- */

struct request {
	char buf[512] __attribute__((aligned(NLMSG_ALIGNTO)));
	size_t len;
};

static struct nlmsghdr *request_start(struct request *r, uint16_t type, uint16_t flags,
				      size_t header)
{
	struct nlmsghdr *h = (struct nlmsghdr *)r->buf;

	memset(r->buf, 0, sizeof(r->buf));
	r->len = NLMSG_SPACE(header);
	h->nlmsg_type = type;
	h->nlmsg_flags = NLM_F_REQUEST | flags;
	return h;
}

static struct nlattr *put(struct request *r, uint16_t type, const void *data, size_t len)
{
	struct nlattr *nla = (struct nlattr *)(r->buf + r->len);

	nla->nla_type = type;
	nla->nla_len = (uint16_t)(NLA_HDRLEN + len);
	memcpy((char *)nla + NLA_HDRLEN, data, len);
	r->len += NLA_ALIGN(nla->nla_len);
	return nla;
}

static void nest_end(struct request *r, struct nlattr *nest)
{
	nest->nla_len = (uint16_t)(r->buf + r->len - (char *)nest);
}

static const struct nlattr *attr_find(const void *data, size_t len, uint16_t type)
{
	const struct nlattr *nla = data;

	while (len >= NLA_HDRLEN && nla->nla_len >= NLA_HDRLEN && nla->nla_len <= len) {
		if ((nla->nla_type & NLA_TYPE_MASK) == type)
			return nla;
		if ((size_t)NLA_ALIGN(nla->nla_len) >= len)
			break;
		len -= NLA_ALIGN(nla->nla_len);
		nla = (const struct nlattr *)((const char *)nla + NLA_ALIGN(nla->nla_len));
	}
	return NULL;
}

#define ATTR_DATA(nla) ((const char *)(nla) + NLA_HDRLEN)
#define ATTR_LEN(nla) ((size_t)(nla)->nla_len - NLA_HDRLEN)

/* Sends a request and reads its replies up to the ack or the end of the
 * dump, calling each() on every reply; 0 or -errno. */
static int talk(struct meshbpf *b, struct request *r,
		void (*each)(void *arg, const struct nlmsghdr *), void *arg)
{
	struct nlmsghdr *h = (struct nlmsghdr *)r->buf;
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	int rc = 0, done = 0, err;
	char *buf;
	ssize_t n;

	h->nlmsg_len = (uint32_t)r->len;
	h->nlmsg_seq = ++b->seq;
	if (sendto(b->rt, r->buf, r->len, 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0)
		return -errno;
	buf = malloc(RECV_LEN);
	if (!buf)
		return -ENOMEM; /* the socket is not drained: replies are skipped by seq */
	while (!done) {
		n = recv(b->rt, buf, RECV_LEN, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			rc = -errno;
			break;
		}
		for (h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_seq != b->seq)
				continue;
			if (h->nlmsg_type == NLMSG_DONE) {
				done = 1;
			} else if (h->nlmsg_type == NLMSG_ERROR) {
				err = ((struct nlmsgerr *)NLMSG_DATA(h))->error;
				if (err && !rc)
					rc = err;
				done = 1;
			} else if (each) {
				each(arg, h);
			}
		}
	}
	free(buf);
	return rc;
}

static int attach(struct meshbpf *b, uint32_t ifindex, int prog)
{
	uint32_t fd = (uint32_t)prog, flags = TCA_BPF_FLAG_ACT_DIRECT;
	struct request r;
	struct tcmsg *t;
	struct nlattr *options;
	int rc;

	t = NLMSG_DATA(request_start(&r, RTM_NEWQDISC, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
				     sizeof(*t)));
	t->tcm_family = AF_UNSPEC;
	t->tcm_ifindex = (int)ifindex;
	t->tcm_handle = TC_H_MAKE(TC_H_CLSACT, 0);
	t->tcm_parent = TC_H_CLSACT;
	put(&r, TCA_KIND, "clsact", sizeof("clsact"));
	rc = talk(b, &r, NULL, NULL);
	if (rc && rc != -EEXIST)
		return rc;

	/* Create, or replace our filter (same priority and handle) in place:
	 * the hook never runs without one. */
	t = NLMSG_DATA(request_start(&r, RTM_NEWTFILTER, NLM_F_ACK | NLM_F_CREATE, sizeof(*t)));
	t->tcm_family = AF_UNSPEC;
	t->tcm_ifindex = (int)ifindex;
	t->tcm_handle = 1;
	t->tcm_parent = TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS);
	t->tcm_info = TC_H_MAKE((uint32_t)PRIO << 16, htons(ETH_P_ALL));
	put(&r, TCA_KIND, "bpf", sizeof("bpf"));
	options = put(&r, TCA_OPTIONS, NULL, 0);
	put(&r, TCA_BPF_FD, &fd, sizeof(fd));
	put(&r, TCA_BPF_NAME, TAG, sizeof(TAG));
	put(&r, TCA_BPF_FLAGS, &flags, sizeof(flags));
	nest_end(&r, options);
	return talk(b, &r, NULL, NULL);
}

static void found_filter(void *arg, const struct nlmsghdr *h)
{
	const struct tcmsg *t = NLMSG_DATA(h);
	const struct nlattr *kind, *options, *name, *id;
	const char *attrs = (const char *)t + NLMSG_ALIGN(sizeof(*t));
	size_t len = h->nlmsg_len - NLMSG_SPACE(sizeof(*t));

	if (h->nlmsg_type != RTM_NEWTFILTER || h->nlmsg_len < NLMSG_SPACE(sizeof(*t)))
		return;
	kind = attr_find(attrs, len, TCA_KIND);
	options = attr_find(attrs, len, TCA_OPTIONS);
	if (!kind || !options || strncmp(ATTR_DATA(kind), "bpf", ATTR_LEN(kind)))
		return;
	name = attr_find(ATTR_DATA(options), ATTR_LEN(options), TCA_BPF_NAME);
	id = attr_find(ATTR_DATA(options), ATTR_LEN(options), TCA_BPF_ID);
	if (name && id && ATTR_LEN(id) == 4 && !strncmp(ATTR_DATA(name), TAG, ATTR_LEN(name)))
		memcpy(arg, ATTR_DATA(id), 4);
}

/* The id of the program our filter on lo runs; 0 if there is none. */
static int anchor_prog(struct meshbpf *b, uint32_t *id)
{
	struct request r;
	struct tcmsg *t;
	int rc;

	*id = 0;
	t = NLMSG_DATA(request_start(&r, RTM_GETTFILTER, NLM_F_DUMP, sizeof(*t)));
	t->tcm_family = AF_UNSPEC;
	t->tcm_ifindex = LOOPBACK;
	t->tcm_parent = TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS);
	rc = talk(b, &r, found_filter, id);
	return rc == -EINVAL || rc == -ENOENT ? 0 : rc; /* no clsact on lo */
}

static void close_maps(struct meshbpf *b)
{
	int *fds[] = { &b->usage, &b->index, &b->lpm6, &b->lpm4, &b->ifids, &b->names,
		       &b->prog_eth, &b->prog_l3 };
	size_t i;

	if (b->slots)
		munmap(b->slots, SLOTS * sizeof(*b->slots));
	b->slots = NULL;
	for (i = 0; i < sizeof(fds) / sizeof(*fds); i++) {
		if (*fds[i] >= 0)
			close(*fds[i]);
		*fds[i] = -1;
	}
}

/* Opens the maps of program `id` by name; -ENOENT unless all are there. */
static int maps_of(struct meshbpf *b, uint32_t id)
{
	struct { const char *name; int *fd; uint32_t key, value; } want[] = {
		{ "meshdp_usage", &b->usage, 4, sizeof(struct meshbpf_slot) },
		{ "meshdp_index", &b->index, sizeof(struct meshbpf_key), 4 },
		{ "meshdp_lpm6", &b->lpm6, 20, sizeof(struct prefix) },
		{ "meshdp_lpm4", &b->lpm4, 8, sizeof(struct prefix) },
		{ "meshdp_ifids", &b->ifids, 4, 4 },
		{ "meshdp_names", &b->names, 4, MESHBPF_NAME_LEN },
	};
	struct bpf_prog_info info;
	struct bpf_map_info map;
	uint32_t ids[8], i, j;
	union bpf_attr a;
	int prog, fd;

	memset(&a, 0, sizeof(a));
	a.prog_id = id;
	prog = (int)sys_bpf(BPF_PROG_GET_FD_BY_ID, &a);
	if (prog < 0)
		return errno == ENOENT ? -ENOENT : -errno;
	memset(&info, 0, sizeof(info));
	info.nr_map_ids = 8;
	info.map_ids = (uintptr_t)ids;
	memset(&a, 0, sizeof(a));
	a.info.bpf_fd = (uint32_t)prog;
	a.info.info_len = sizeof(info);
	a.info.info = (uintptr_t)&info;
	if (sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &a) < 0) {
		fd = -errno;
		close(prog);
		return fd;
	}
	close(prog);
	for (i = 0; i < info.nr_map_ids && i < 8; i++) {
		memset(&a, 0, sizeof(a));
		a.map_id = ids[i];
		fd = (int)sys_bpf(BPF_MAP_GET_FD_BY_ID, &a);
		if (fd < 0)
			continue;
		memset(&map, 0, sizeof(map));
		memset(&a, 0, sizeof(a));
		a.info.bpf_fd = (uint32_t)fd;
		a.info.info_len = sizeof(map);
		a.info.info = (uintptr_t)&map;
		j = sizeof(want) / sizeof(*want);
		if (!sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &a))
			for (j = 0; j < sizeof(want) / sizeof(*want); j++)
				if (!strcmp(map.name, want[j].name) && map.key_size == want[j].key &&
				    map.value_size == want[j].value && *want[j].fd < 0)
					break;
		if (j < sizeof(want) / sizeof(*want))
			*want[j].fd = fd;
		else
			close(fd);
	}
	for (j = 0; j < sizeof(want) / sizeof(*want); j++)
		if (*want[j].fd < 0)
			return -ENOENT;
	return 0;
}

static int maps_new(struct meshbpf *b)
{
	/* The hashes and tries allocate as they fill (tries require it). */
	b->usage = map_create(BPF_MAP_TYPE_ARRAY, 4, sizeof(struct meshbpf_slot), SLOTS,
			      BPF_F_MMAPABLE, "meshdp_usage");
	b->index = map_create(BPF_MAP_TYPE_HASH, sizeof(struct meshbpf_key), 4, SLOTS,
			      BPF_F_NO_PREALLOC, "meshdp_index");
	b->lpm6 = map_create(BPF_MAP_TYPE_LPM_TRIE, 20, sizeof(struct prefix), PREFIXES_MAX,
			     BPF_F_NO_PREALLOC, "meshdp_lpm6");
	b->lpm4 = map_create(BPF_MAP_TYPE_LPM_TRIE, 8, sizeof(struct prefix), PREFIXES_MAX,
			     BPF_F_NO_PREALLOC, "meshdp_lpm4");
	b->ifids = map_create(BPF_MAP_TYPE_ARRAY, 4, 4, IFIDS, 0, "meshdp_ifids");
	b->names = map_create(BPF_MAP_TYPE_HASH, 4, MESHBPF_NAME_LEN, NAMES_MAX,
			      BPF_F_NO_PREALLOC, "meshdp_names");
	if (b->usage < 0)
		return b->usage;
	if (b->index < 0)
		return b->index;
	if (b->lpm6 < 0)
		return b->lpm6;
	if (b->lpm4 < 0)
		return b->lpm4;
	if (b->ifids < 0)
		return b->ifids;
	return b->names < 0 ? b->names : 0;
}

void meshbpf_init(struct meshbpf *b)
{
	memset(b, 0, sizeof(*b));
	b->rt = b->usage = b->index = b->lpm6 = b->lpm4 = b->ifids = b->names = -1;
	b->prog_eth = b->prog_l3 = -1;
}

void meshbpf_close(struct meshbpf *b)
{
	close_maps(b);
	if (b->rt >= 0)
		close(b->rt);
	free(b->links);
	free(b->names_of);
	b->links = NULL;
	b->names_of = NULL;
	b->n_links = b->links_cap = b->n_names = b->names_cap = 0;
	b->rt = -1;
}

static int names_add(struct meshbpf *b, uint32_t id, const char *name)
{
	struct meshbpf_name *bigger;
	size_t cap;

	if (b->n_names == b->names_cap) {
		cap = b->names_cap ? 2 * b->names_cap : 64;
		bigger = realloc(b->names_of, cap * sizeof(*bigger));
		if (!bigger)
			return -ENOMEM;
		b->names_of = bigger;
		b->names_cap = cap;
	}
	b->names_of[b->n_names].id = id;
	memcpy(b->names_of[b->n_names++].name, name, MESHBPF_NAME_LEN);
	if (!(id & MESHBPF_RAW) && id >= b->next_id)
		b->next_id = id + 1;
	return 0;
}

/* Reads the names map into names_of. */
static int names_load(struct meshbpf *b)
{
	char name[MESHBPF_NAME_LEN];
	uint32_t key, next;
	union bpf_attr a;
	int rc = 0, first = 1;

	while (!rc) {
		memset(&a, 0, sizeof(a));
		a.map_fd = (uint32_t)b->names;
		a.key = first ? 0 : (uintptr_t)&key;
		a.next_key = (uintptr_t)&next;
		if (sys_bpf(BPF_MAP_GET_NEXT_KEY, &a) < 0)
			return errno == ENOENT ? 0 : -errno;
		first = 0;
		key = next;
		memset(&a, 0, sizeof(a));
		a.map_fd = (uint32_t)b->names;
		a.key = (uintptr_t)&key;
		a.value = (uintptr_t)name;
		if (!sys_bpf(BPF_MAP_LOOKUP_ELEM, &a)) /* else deleted meanwhile */
			rc = names_add(b, key, name);
	}
	return rc;
}

static int name_record(struct meshbpf *b, uint32_t id, const char *name)
{
	union bpf_attr a;

	memset(&a, 0, sizeof(a));
	a.map_fd = (uint32_t)b->names;
	a.key = (uintptr_t)&id;
	a.value = (uintptr_t)name;
	if (sys_bpf(BPF_MAP_UPDATE_ELEM, &a) < 0)
		return -errno;
	return names_add(b, id, name);
}

/* Forgets the names known here and reads them again: another opener of the
 * same state (a test's, a restarted meter's) may have named interfaces. */
static int names_reload(struct meshbpf *b)
{
	b->n_names = 0;
	return names_load(b);
}

static uint32_t name_known(const struct meshbpf *b, const char *name)
{
	size_t i;

	for (i = 0; i < b->n_names; i++)
		if (!(b->names_of[i].id & MESHBPF_RAW) &&
		    !strncmp(b->names_of[i].name, name, MESHBPF_NAME_LEN))
			return b->names_of[i].id;
	return 0;
}

/* The id of an interface name, given one on first sight; 0 on failure. An
 * id is taken only where none is (BPF_NOEXIST): one another opener took
 * meanwhile sends us to read the names again. */
static uint32_t name_id(struct meshbpf *b, const char *name)
{
	union bpf_attr a;
	uint32_t id;
	int tries;

	for (tries = 0; tries < NAME_TRIES; tries++) {
		id = name_known(b, name);
		if (id)
			return id;
		if (b->next_id & MESHBPF_RAW)
			return 0;
		memset(&a, 0, sizeof(a));
		a.map_fd = (uint32_t)b->names;
		a.key = (uintptr_t)&b->next_id;
		a.value = (uintptr_t)name;
		a.flags = BPF_NOEXIST;
		if (!sys_bpf(BPF_MAP_UPDATE_ELEM, &a)) {
			id = b->next_id;
			return names_add(b, id, name) ? 0 : id;
		}
		if (errno != EEXIST || names_reload(b))
			return 0;
	}
	return 0;
}

int meshbpf_open(struct meshbpf *b, int create, char *log, size_t log_len)
{
	union bpf_attr a;
	uint32_t id = 0;
	int rc, tries, found;

	close_maps(b);
	b->n_links = 0; /* attach again, with the programs about to load */
	b->n_names = 0;
	b->next_id = 1;
	if (!create) {
		/* Another opener (a test's, the meter's after a restart) may
		 * replace the program on lo between our dump and our lookup: its
		 * successor holds the same maps, so look again. Only no anchor at
		 * all means no state. */
		for (tries = 0; tries < ANCHOR_TRIES; tries++) {
			rc = anchor_prog(b, &id);
			if (!rc)
				rc = id ? maps_of(b, id) : -ENOENT;
			if (rc != -ENOENT || !id)
				break;
			close_maps(b);
		}
	} else {
		rc = maps_new(b);
	}
	found = !create && !rc;
	if (!rc) {
		b->slots = mmap(NULL, SLOTS * sizeof(*b->slots), PROT_READ | PROT_WRITE, MAP_SHARED,
				b->usage, 0);
		if (b->slots == MAP_FAILED) {
			b->slots = NULL;
			rc = -errno;
		} else if (create) {
			b->slots[0].value.packets = 1; /* the first free element */
		} else if (b->slots[0].value.packets > SLOTS) {
			rc = -ENOENT; /* spent: to be made anew */
			found = 0;
		}
	}
	if (!rc)
		rc = names_load(b);
	if (!rc) {
		b->prog_eth = prog_load(b, ETH_HLEN, "meshdp_eth", log, log_len);
		rc = b->prog_eth < 0 ? b->prog_eth : 0;
	}
	if (!rc) {
		b->prog_l3 = prog_load(b, 0, "meshdp_l3", log, log_len);
		rc = b->prog_l3 < 0 ? b->prog_l3 : 0;
	}
	if (!rc) { /* the names map is not in the program: list it among its maps */
		memset(&a, 0, sizeof(a));
		a.prog_bind_map.prog_fd = (uint32_t)b->prog_eth;
		a.prog_bind_map.map_fd = (uint32_t)b->names;
		rc = sys_bpf(BPF_PROG_BIND_MAP, &a) < 0 ? -errno : 0;
	}
	/* lo first: it anchors the state from now on. */
	if (!rc && create)
		rc = attach(b, LOOPBACK, b->prog_eth);
	if (!rc)
		rc = meshbpf_sweep(b, 1);
	if (rc)
		close_maps(b);
	/* Found state that fails later is not missing state: the caller must
	 * not make it anew (that would drop every count). */
	if (rc == -ENOENT && found)
		rc = -EIO;
	return rc;
}

/* -- interfaces --------------------------------------------------------------- */

struct sweep {
	struct meshbpf_link *links;
	size_t n, cap;
	uint16_t *types;
	int rc;
};

static void found_link(void *arg, const struct nlmsghdr *h)
{
	struct sweep *s = arg;
	const struct ifinfomsg *ifi = NLMSG_DATA(h);
	const struct nlattr *name;
	struct meshbpf_link *bigger;
	uint16_t *types;
	size_t cap;

	if (h->nlmsg_type != RTM_NEWLINK || h->nlmsg_len < NLMSG_SPACE(sizeof(*ifi)))
		return;
	name = attr_find((const char *)ifi + NLMSG_ALIGN(sizeof(*ifi)),
			 h->nlmsg_len - NLMSG_SPACE(sizeof(*ifi)), IFLA_IFNAME);
	if (!name)
		return;
	if (s->n == s->cap) {
		cap = s->cap ? 2 * s->cap : 64;
		bigger = realloc(s->links, cap * sizeof(*bigger));
		types = realloc(s->types, cap * sizeof(*types));
		if (bigger)
			s->links = bigger;
		if (types)
			s->types = types;
		if (!bigger || !types) {
			s->rc = -ENOMEM;
			return;
		}
		s->cap = cap;
	}
	memset(&s->links[s->n], 0, sizeof(*s->links));
	s->links[s->n].ifindex = (uint32_t)ifi->ifi_index;
	strncpy(s->links[s->n].name, ATTR_DATA(name),
		ATTR_LEN(name) < MESHBPF_NAME_LEN ? ATTR_LEN(name) : MESHBPF_NAME_LEN - 1);
	/* A port of a bond, bridge or team: what it sends went through its
	 * master's egress hook first, where it was counted. */
	s->types[s->n++] = attr_find((const char *)ifi + NLMSG_ALIGN(sizeof(*ifi)),
				     h->nlmsg_len - NLMSG_SPACE(sizeof(*ifi)), IFLA_MASTER)
			   ? ARPHRD_VOID : ifi->ifi_type;
}

static const struct meshbpf_link *link_of(const struct meshbpf *b, uint32_t ifindex)
{
	size_t i;

	for (i = 0; i < b->n_links; i++)
		if (b->links[i].ifindex == ifindex)
			return &b->links[i];
	return NULL;
}

/* The program for a device type: its link header is on the packet at egress
 * (ethernet, lo) or there is none (tun, WireGuard, PPP); -1: not counted
 * (other link types, and ports: ARPHRD_VOID, see found_link). */
static int prog_for(const struct meshbpf *b, uint16_t type)
{
	switch (type) {
	case ARPHRD_ETHER:
	case ARPHRD_LOOPBACK:
		return b->prog_eth;
	case ARPHRD_NONE:
	case ARPHRD_PPP:
	case ARPHRD_RAWIP:
		return b->prog_l3;
	default:
		return -1;
	}
}

int meshbpf_sweep(struct meshbpf *b, int force)
{
	struct sweep s = { 0 };
	const struct meshbpf_link *old;
	struct meshbpf_link *l;
	struct request r;
	struct ifinfomsg *ifi;
	union bpf_attr a;
	int rc, prog;
	size_t i;

	if (b->usage < 0)
		return -EBADF;
	ifi = NLMSG_DATA(request_start(&r, RTM_GETLINK, NLM_F_DUMP, sizeof(*ifi)));
	ifi->ifi_family = AF_UNSPEC;
	rc = talk(b, &r, found_link, &s);
	if (!rc)
		rc = s.rc;
	for (i = 0; !rc && i < s.n; i++) {
		l = &s.links[i];
		old = link_of(b, l->ifindex);
		l->attached = old && old->attached && !force;
		l->id = old && !strcmp(old->name, l->name) ? old->id : name_id(b, l->name);
		if (!l->id) {
			rc = -ENOSPC;
		} else if (l->ifindex < IFIDS && (!old || old->id != l->id || force)) {
			memset(&a, 0, sizeof(a));
			a.map_fd = (uint32_t)b->ifids;
			a.key = (uintptr_t)&l->ifindex;
			a.value = (uintptr_t)&l->id;
			if (sys_bpf(BPF_MAP_UPDATE_ELEM, &a) < 0)
				rc = -errno;
		}
		prog = prog_for(b, s.types[i]);
		if (rc || l->attached || prog < 0)
			continue;
		rc = attach(b, l->ifindex, prog);
		if (rc == -ENODEV) /* gone since the dump */
			rc = 0;
		else
			l->attached = !rc;
	}
	free(s.types);
	if (rc) {
		free(s.links);
		return rc;
	}
	free(b->links);
	b->links = s.links;
	b->n_links = s.n;
	b->links_cap = s.cap;
	return 0;
}

void meshbpf_name(struct meshbpf *b, uint32_t id, char name[MESHBPF_NAME_LEN])
{
	const struct meshbpf_link *l;
	size_t i;
	int tries;

	memset(name, 0, MESHBPF_NAME_LEN);
	for (tries = 0; tries < 2; tries++) {
		for (i = 0; i < b->n_names; i++)
			if (b->names_of[i].id == id) {
				memcpy(name, b->names_of[i].name, MESHBPF_NAME_LEN);
				return;
			}
		/* Named by another opener since we read the names. */
		if (id & MESHBPF_RAW || names_reload(b))
			break;
	}
	/* Counted before a sweep named it: record its name while it is there. */
	l = id & MESHBPF_RAW ? link_of(b, id & ~MESHBPF_RAW) : NULL;
	if (l && !name_record(b, id, l->name))
		memcpy(name, l->name, MESHBPF_NAME_LEN);
}

/* -- counters and prefixes --------------------------------------------------------- */

int meshbpf_read(const struct meshbpf *b,
		 int (*each)(void *arg, const struct meshbpf_key *, const struct meshbpf_value *),
		 void *arg)
{
	uint64_t end = __atomic_load_n(&b->slots[0].value.packets, __ATOMIC_ACQUIRE);
	const struct meshbpf_slot *slot;
	struct meshbpf_value value;
	uint64_t i;
	int rc = 0;

	if (end > SLOTS)
		return -ENOSPC;
	for (i = 1; !rc && i < end; i++) {
		slot = &b->slots[i];
		/* Acquire: the key's other fields were written before its family. */
		if (!__atomic_load_n(&slot->key.family, __ATOMIC_ACQUIRE))
			continue;
		value.packets = __atomic_load_n(&slot->value.packets, __ATOMIC_RELAXED);
		value.bytes = __atomic_load_n(&slot->value.bytes, __ATOMIC_RELAXED);
		rc = each(arg, &slot->key, &value);
	}
	return rc;
}

static int lpm_exact(const struct meshbpf *b, const struct meshbpf_key *k)
{
	struct lpm_key key = { .prefixlen = k->len };
	struct prefix found;
	union bpf_attr a;

	memcpy(key.addr, k->addr, sizeof(key.addr));
	memset(&a, 0, sizeof(a));
	a.map_fd = (uint32_t)(k->family == 6 ? b->lpm6 : b->lpm4);
	a.key = (uintptr_t)&key;
	a.value = (uintptr_t)&found;
	return !sys_bpf(BPF_MAP_LOOKUP_ELEM, &a) && found.len == k->len;
}

struct doomed {
	struct meshbpf *b;
	const char *name;
	struct meshbpf_slot **slots;
	size_t n, cap;
};

/* k is an element's key in the mapped array (see meshbpf_read). */
static int choose(void *arg, const struct meshbpf_key *k, const struct meshbpf_value *v)
{
	struct doomed *d = arg;
	char in[MESHBPF_NAME_LEN], out[MESHBPF_NAME_LEN];
	struct meshbpf_slot **bigger;

	(void)v;
	if (d->name) {
		meshbpf_name(d->b, k->in, in);
		meshbpf_name(d->b, k->out, out);
		if (strncmp(in, d->name, MESHBPF_NAME_LEN) && strncmp(out, d->name, MESHBPF_NAME_LEN))
			return 0;
	} else if (k->len == OTHER_LEN || lpm_exact(d->b, k)) {
		return 0;
	}
	if (d->n == d->cap) {
		d->cap = d->cap ? 2 * d->cap : 256;
		bigger = realloc(d->slots, d->cap * sizeof(*bigger));
		if (!bigger)
			return -ENOMEM;
		d->slots = bigger;
	}
	d->slots[d->n++] = (struct meshbpf_slot *)((const char *)k -
						   offsetof(struct meshbpf_slot, key));
	return 0;
}

int meshbpf_delete(struct meshbpf *b, const char *name)
{
	struct doomed d = { .b = b, .name = name };
	union bpf_attr a;
	size_t i;
	int rc;

	rc = meshbpf_read(b, choose, &d);
	for (i = 0; !rc && i < d.n; i++) {
		/* Out of the index first: a later packet takes a new element. */
		memset(&a, 0, sizeof(a));
		a.map_fd = (uint32_t)b->index;
		a.key = (uintptr_t)&d.slots[i]->key;
		if (sys_bpf(BPF_MAP_DELETE_ELEM, &a) < 0 && errno != ENOENT)
			rc = -errno;
		else
			__atomic_store_n(&d.slots[i]->key.family, 0, __ATOMIC_RELEASE);
	}
	free(d.slots);
	return rc ? rc : (int)d.n;
}

static int prefix_wanted(const struct meshbpf_prefix *wanted, size_t n, uint32_t family,
			 const struct lpm_key *key)
{
	size_t i;

	for (i = 0; i < n; i++)
		if (wanted[i].family == family && wanted[i].len == key->prefixlen &&
		    !memcmp(wanted[i].addr, key->addr, family == 6 ? 16 : 4))
			return 1;
	return 0;
}

/* Deletes what the trie of `family` holds beyond `wanted`. */
static int prefixes_prune(struct meshbpf *b, uint32_t family, const struct meshbpf_prefix *wanted,
			  size_t n)
{
	struct lpm_key *keys = NULL, *bigger;
	size_t n_keys = 0, cap = 0, i;
	union bpf_attr a;
	int rc = 0;

	for (;;) {
		if (n_keys == cap) {
			cap = cap ? 2 * cap : 256;
			bigger = realloc(keys, cap * sizeof(*keys));
			if (!bigger) {
				rc = -ENOMEM;
				break;
			}
			keys = bigger;
		}
		memset(&keys[n_keys], 0, sizeof(*keys));
		memset(&a, 0, sizeof(a));
		a.map_fd = (uint32_t)(family == 6 ? b->lpm6 : b->lpm4);
		a.key = n_keys ? (uintptr_t)&keys[n_keys - 1] : 0;
		a.next_key = (uintptr_t)&keys[n_keys];
		if (sys_bpf(BPF_MAP_GET_NEXT_KEY, &a) < 0) {
			rc = errno == ENOENT ? 0 : -errno;
			break;
		}
		n_keys++;
	}
	for (i = 0; !rc && i < n_keys; i++) {
		if (prefix_wanted(wanted, n, family, &keys[i]))
			continue;
		memset(&a, 0, sizeof(a));
		a.map_fd = (uint32_t)(family == 6 ? b->lpm6 : b->lpm4);
		a.key = (uintptr_t)&keys[i];
		if (sys_bpf(BPF_MAP_DELETE_ELEM, &a) < 0 && errno != ENOENT)
			rc = -errno;
	}
	free(keys);
	return rc;
}

int meshbpf_prefixes(struct meshbpf *b, const struct meshbpf_prefix *wanted, size_t n)
{
	struct lpm_key key;
	struct prefix value;
	union bpf_attr a;
	size_t i;
	int rc;

	for (i = 0; i < n; i++)
		if ((wanted[i].family != 6 && wanted[i].family != 4) ||
		    wanted[i].len > (wanted[i].family == 6 ? 128u : 32u))
			return -EINVAL;
	rc = prefixes_prune(b, 6, wanted, n);
	if (!rc)
		rc = prefixes_prune(b, 4, wanted, n);
	for (i = 0; !rc && i < n; i++) {
		memset(&key, 0, sizeof(key));
		memset(&value, 0, sizeof(value));
		key.prefixlen = value.len = wanted[i].len;
		memcpy(key.addr, wanted[i].addr, 16);
		memcpy(value.addr, wanted[i].addr, 16);
		memset(&a, 0, sizeof(a));
		a.map_fd = (uint32_t)(wanted[i].family == 6 ? b->lpm6 : b->lpm4);
		a.key = (uintptr_t)&key;
		a.value = (uintptr_t)&value;
		if (sys_bpf(BPF_MAP_UPDATE_ELEM, &a) < 0)
			rc = -errno;
	}
	return rc;
}
