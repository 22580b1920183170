/*
 * libmeshdp: the dataplane shim's C side, a thin layer over libnftables.
 *
 * Rules are applied in-process through libnftables (about 4 ms for a batch)
 * instead of forking the nft command (20-33 ms). A context owns one netfilter
 * netlink socket, opened in the network namespace the context was created
 * for, and buffers nft's output and error text so callers get them as
 * strings instead of on the process's stdout/stderr.
 *
 * A context is not thread-safe, and libnftables keeps some process-wide
 * state (its interface cache), so callers serialise all calls.
 *
 * Reading many counters is the one thing libnftables is slow at: it formats
 * every set element as text (about 14 us each, 1.4 s for 100,000), so a
 * context also holds a raw netfilter netlink socket, opened in the same
 * namespace, for meshdp_usage_dump: netlink dumps of the usage sets, parsed
 * here into dense arrays (see below).
 *
 * Forwarded traffic is counted by an eBPF program instead (meshbpf.c); a
 * context also holds its state and an rtnetlink socket in the namespace,
 * and the usage dump merges its counters in.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <unistd.h>

#include <linux/netfilter.h>
#include <linux/netfilter/nf_tables.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netlink.h>
#include <nftables/libnftables.h>

#include "meshbpf.h"

struct meshdp_ctx {
	struct nft_ctx *nft;
	int nl;		/* NETLINK_NETFILTER socket in the same namespace */
	uint32_t seq;
	struct meshbpf bpf;	/* forwarded counters; its rtnetlink socket too */
};

static int netlink_open(int protocol)
{
	struct sockaddr_nl local = { .nl_family = AF_NETLINK };
	int fd, saved;

	fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, protocol);
	if (fd < 0)
		return -1;
	if (bind(fd, (struct sockaddr *)&local, sizeof(local)) < 0) {
		saved = errno;
		close(fd);
		errno = saved;
		return -1;
	}
	return fd;
}

/* The sockets in the current namespace; 0, or -1 with errno set. */
static int sockets_new(struct meshdp_ctx *ctx)
{
	ctx->nft = nft_ctx_new(NFT_CTX_DEFAULT);
	if (!ctx->nft)
		return -1;
	ctx->nl = netlink_open(NETLINK_NETFILTER);
	if (ctx->nl < 0)
		return -1;
	ctx->bpf.rt = netlink_open(NETLINK_ROUTE);
	return ctx->bpf.rt < 0 ? -1 : 0;
}

/* nft_ctx_new opens the netlink socket, so the socket (and every command run
 * through the context later) belongs to the namespace current at that moment;
 * the same holds for the dump socket. setns() switches only the calling
 * thread. */
static int sockets_new_in(struct meshdp_ctx *ctx, const char *netns_path)
{
	int home, target, saved, rc;

	if (!netns_path)
		return sockets_new(ctx);

	target = open(netns_path, O_RDONLY | O_CLOEXEC);
	if (target < 0)
		return -1;
	home = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	if (home < 0) {
		saved = errno;
		close(target);
		errno = saved;
		return -1;
	}
	if (setns(target, CLONE_NEWNET) < 0) {
		saved = errno;
		close(home);
		close(target);
		errno = saved;
		return -1;
	}
	rc = sockets_new(ctx);
	saved = errno;
	/* Going back to a namespace we hold open cannot fail in practice; if it
	 * did, this thread would silently act on the wrong namespace from now
	 * on, which is worse than stopping. */
	if (setns(home, CLONE_NEWNET) < 0)
		abort();
	close(home);
	close(target);
	errno = saved;
	return rc;
}

/* Returns NULL with errno set on failure. netns_path is a namespace file such
 * as /run/netns/NAME, or NULL for the caller's own namespace. */
struct meshdp_ctx *meshdp_ctx_new(const char *netns_path)
{
	struct meshdp_ctx *ctx;
	int saved;

	ctx = calloc(1, sizeof(*ctx));
	if (!ctx)
		return NULL;
	ctx->nl = -1;
	meshbpf_init(&ctx->bpf);
	if (sockets_new_in(ctx, netns_path) < 0)
		goto fail;
	if (nft_ctx_buffer_output(ctx->nft) || nft_ctx_buffer_error(ctx->nft)) {
		errno = ENOMEM;
		goto fail;
	}
	return ctx;
fail:
	saved = errno;
	if (ctx->nft)
		nft_ctx_free(ctx->nft);
	if (ctx->nl >= 0)
		close(ctx->nl);
	meshbpf_close(&ctx->bpf);
	free(ctx);
	errno = saved;
	return NULL;
}

void meshdp_ctx_free(struct meshdp_ctx *ctx)
{
	if (!ctx)
		return;
	nft_ctx_free(ctx->nft);
	close(ctx->nl);
	meshbpf_close(&ctx->bpf);
	free(ctx);
}

/* Runs a batch of nft commands as one transaction. output_flags are
 * libnftables' NFT_CTX_OUTPUT_* bits for this call (e.g. JSON). On return
 * *out and *err hold copies of what nft printed (the caller releases them
 * with meshdp_str_free); the result is nft's return code (0 = success), or
 * -ENOMEM with both strings NULL if they could not be copied. */
int meshdp_run(struct meshdp_ctx *ctx, const char *commands, unsigned int output_flags,
	       char **out, char **err)
{
	int rc;

	nft_ctx_output_set_flags(ctx->nft, output_flags);
	rc = nft_run_cmd_from_buffer(ctx->nft, commands);
	/* The buffers are only valid until the next run: copy them. */
	*out = strdup(nft_ctx_get_output_buffer(ctx->nft));
	*err = strdup(nft_ctx_get_error_buffer(ctx->nft));
	if (!*out || !*err) {
		free(*out);
		free(*err);
		*out = *err = NULL;
		return -ENOMEM;
	}
	return rc;
}

void meshdp_str_free(char *s)
{
	free(s);
}

/*
 * Usage sets. A usage set is keyed `ifname . ifname . ipv6_addr . mark` (or
 * ipv4_addr): the interface a forwarded packet came in on, the one it went
 * out on, and its destination prefix as network address and length (length
 * 255: no configured prefix covered it, "other"); each element has a counter.
 * Elements whose interface names are both `label` never match a packet (the
 * label is not a valid interface name); their comment names the destination
 * whose key they carry, and the one of "other" holds the table's epoch.
 *
 * The usage state is sharded into several sets: the kernel restarts its walk
 * of a set from the first element for every 32 KiB dump message, so one set
 * of n elements costs O(n^2); shards keep n small. meshdp_usage_dump reads
 * every shard, one netlink dump each, checks that no transaction committed in
 * between (the ruleset generation each reply carries), and adds the counters
 * up densely, so that the caller does no per-element work. It returns one
 * malloc'd buffer (release it with meshdp_str_free), in native byte order:
 *
 *   struct usage_header
 *   names     n_names x 16 bytes           interfaces (NUL padded), dump order
 *   counters  n_names x n_dests x 4 x u64   by interface, then destination:
 *                                           packets and bytes received from
 *                                           it, packets and bytes sent out
 *                                           through it
 *   labels    n_dests x (u32 index, u32 n, n bytes of text, padded to 4)
 *   keys      n_keys x struct usage_key     every element: interfaces as
 *                                           name indexes, the index of its
 *                                           set in `sets` (n_sets for the
 *                                           eBPF counters), its destination
 *
 * Destination 0 is "other" (its label text is the epoch); the others are
 * numbered in the order their labels were read. An element whose
 * destination has no label is stale (its prefix was removed): listed in
 * keys with dest UINT32_MAX (n_stale of them), not counted.
 */
#define NAME_LEN 16 /* IFNAMSIZ: each ifname part of a key */
#define DEST_MAX 20 /* an IPv6 address and a u32 length */
#define OTHER_LEN 255
#define RECV_LEN 65536 /* the kernel sends at most 32 KiB per dump message */

struct usage_header {
	uint32_t version, n_names, n_dests, n_keys, n_stale, labels_len, reserved[2];
};

struct usage_key {
	uint32_t in, out, set, dest, family, prefix_len;
	unsigned char addr[16];
};

/* A destination as the key carries it: the address and length fields. */
struct dest {
	uint32_t size; /* 8 (IPv4) or 20 (IPv6) */
	unsigned char bytes[DEST_MAX];
};

struct usage_rec {
	uint32_t in, out, set;
	struct dest dest;
	uint64_t packets, bytes;
};

struct usage_label {
	struct dest dest;
	uint32_t text_len;
	char text[256];
};

struct usage_dump {
	char label[NAME_LEN];
	char *names;			/* n_names x NAME_LEN */
	size_t names_cap;
	uint32_t n_names;
	uint32_t *slots, n_slots;	/* open addressing: name index + 1, 0 = free */
	struct usage_rec *recs;
	size_t n_recs, recs_cap;
	struct usage_label *labels;
	size_t n_labels, labels_cap;
	uint32_t set;			/* index of the set being read */
	int rc;				/* first parse error, as -errno */
	int generation;			/* of the first reply (16 bits), -1 before it */
	int changed;			/* a later reply carried another generation */
};

static int grow(void **array, size_t *cap, size_t need, size_t size)
{
	size_t want = *cap ? *cap : 64;
	void *bigger;

	if (need <= *cap)
		return 0;
	while (want < need)
		want *= 2;
	bigger = realloc(*array, want * size);
	if (!bigger)
		return -ENOMEM;
	*array = bigger;
	*cap = want;
	return 0;
}

/* FNV-1a over the padded name. */
static uint32_t name_hash(const char *name)
{
	uint32_t h = 2166136261u;
	int i;

	for (i = 0; i < NAME_LEN; i++)
		h = (h ^ (unsigned char)name[i]) * 16777619u;
	return h;
}

static int rehash(struct usage_dump *d, uint32_t n_slots)
{
	uint32_t *slots = calloc(n_slots, sizeof(*slots)), i, j;

	if (!slots)
		return -ENOMEM;
	for (i = 0; i < d->n_names; i++) {
		j = name_hash(d->names + (size_t)i * NAME_LEN) & (n_slots - 1);
		while (slots[j])
			j = (j + 1) & (n_slots - 1);
		slots[j] = i + 1;
	}
	free(d->slots);
	d->slots = slots;
	d->n_slots = n_slots;
	return 0;
}

/* The index of an interface name, added on first sight; -errno on failure. */
static int64_t name_index(struct usage_dump *d, const char *name)
{
	uint32_t j;

	if (2 * (d->n_names + 1) > d->n_slots && rehash(d, d->n_slots ? 2 * d->n_slots : 64))
		return -ENOMEM;
	for (j = name_hash(name) & (d->n_slots - 1); d->slots[j]; j = (j + 1) & (d->n_slots - 1))
		if (!memcmp(d->names + (size_t)(d->slots[j] - 1) * NAME_LEN, name, NAME_LEN))
			return d->slots[j] - 1;
	if (grow((void **)&d->names, &d->names_cap, d->n_names + 1, NAME_LEN))
		return -ENOMEM;
	memcpy(d->names + (size_t)d->n_names * NAME_LEN, name, NAME_LEN);
	d->slots[j] = ++d->n_names;
	return d->n_names - 1;
}

#define NLA_DATA(nla) ((const void *)((const char *)(nla) + NLA_HDRLEN))
#define NLA_LEN(nla) ((size_t)(nla)->nla_len - NLA_HDRLEN)

static const struct nlattr *nla_check(const void *nla, size_t left)
{
	const struct nlattr *a = nla;

	return left >= NLA_HDRLEN && a->nla_len >= NLA_HDRLEN && a->nla_len <= left ? a : NULL;
}

/* The attribute after nla, with *left the bytes from nla on; NULL at the end. */
static const struct nlattr *nla_next(const struct nlattr *nla, size_t *left)
{
	size_t step = NLA_ALIGN((size_t)nla->nla_len);

	if (step >= *left)
		return NULL;
	*left -= step;
	return nla_check((const char *)nla + step, *left);
}

/* Each attribute nested in `outer`; `left` is scratch. */
#define nla_for_each_nested(nla, outer, left) \
	for ((left) = NLA_LEN(outer), (nla) = nla_check(NLA_DATA(outer), (left)); (nla); \
	     (nla) = nla_next((nla), &(left)))

/* Points tb[type] at each attribute in [data, data + len) up to max. */
static void nla_parse(const struct nlattr **tb, int max, const void *data, size_t len)
{
	const struct nlattr *nla;
	int type;

	memset(tb, 0, (max + 1) * sizeof(*tb));
	for (nla = nla_check(data, len); nla; nla = nla_next(nla, &len)) {
		type = nla->nla_type & NLA_TYPE_MASK;
		if (type <= max)
			tb[type] = nla;
	}
}

static uint64_t nla_be64(const struct nlattr *nla)
{
	uint64_t v = 0;

	if (nla && NLA_LEN(nla) == sizeof(v))
		memcpy(&v, NLA_DATA(nla), sizeof(v));
	return be64toh(v);
}

/* Reads a counter expression's packets and bytes; 1 if it is one. */
static int counter_expr(const struct nlattr *expr, uint64_t *packets, uint64_t *bytes)
{
	const struct nlattr *tb[NFTA_EXPR_MAX + 1], *ctr[NFTA_COUNTER_MAX + 1];

	nla_parse(tb, NFTA_EXPR_MAX, NLA_DATA(expr), NLA_LEN(expr));
	if (!tb[NFTA_EXPR_NAME] || !tb[NFTA_EXPR_DATA] ||
	    strncmp(NLA_DATA(tb[NFTA_EXPR_NAME]), "counter", NLA_LEN(tb[NFTA_EXPR_NAME])))
		return 0;
	nla_parse(ctr, NFTA_COUNTER_MAX, NLA_DATA(tb[NFTA_EXPR_DATA]),
		  NLA_LEN(tb[NFTA_EXPR_DATA]));
	*packets = nla_be64(ctr[NFTA_COUNTER_PACKETS]);
	*bytes = nla_be64(ctr[NFTA_COUNTER_BYTES]);
	return 1;
}

/* The element's comment (libnftnl's udata TLV of type 0), or NULL. */
static const char *elem_comment(const struct nlattr *udata, uint32_t *len)
{
	const unsigned char *p = NLA_DATA(udata), *end = p + NLA_LEN(udata);

	while (p + 2 <= end && p + 2 + p[1] <= end) {
		if (p[0] == 0) {
			*len = strnlen((const char *)p + 2, p[1]);
			return (const char *)p + 2;
		}
		p += 2 + p[1];
	}
	return NULL;
}

static uint32_t dest_len_field(const struct dest *d)
{
	uint32_t len;

	memcpy(&len, d->bytes + d->size - 4, sizeof(len));
	return len;
}

static int parse_elem(struct usage_dump *d, const struct nlattr *elem)
{
	const struct nlattr *tb[NFTA_SET_ELEM_MAX + 1], *key[NFTA_DATA_MAX + 1], *expr;
	uint64_t packets = 0, bytes = 0;
	const char *in, *out, *text;
	struct usage_label *label;
	struct dest dest = { 0 };
	int64_t in_index, out_index;
	size_t key_len, left;
	uint32_t len;
	int found = 0;

	nla_parse(tb, NFTA_SET_ELEM_MAX, NLA_DATA(elem), NLA_LEN(elem));
	if (!tb[NFTA_SET_ELEM_KEY])
		return -EPROTO;
	nla_parse(key, NFTA_DATA_MAX, NLA_DATA(tb[NFTA_SET_ELEM_KEY]),
		  NLA_LEN(tb[NFTA_SET_ELEM_KEY]));
	if (!key[NFTA_DATA_VALUE])
		return -EPROTO;
	key_len = NLA_LEN(key[NFTA_DATA_VALUE]);
	if (key_len != 2 * NAME_LEN + 8 && key_len != 2 * NAME_LEN + 20)
		return -EPROTO; /* not keyed `ifname . ifname . ip(v6)_addr . mark` */
	in = NLA_DATA(key[NFTA_DATA_VALUE]);
	out = in + NAME_LEN;
	dest.size = (uint32_t)key_len - 2 * NAME_LEN;
	memcpy(dest.bytes, out + NAME_LEN, dest.size);

	if (!memcmp(in, d->label, NAME_LEN) && !memcmp(out, d->label, NAME_LEN)) {
		if (!tb[NFTA_SET_ELEM_USERDATA] ||
		    !(text = elem_comment(tb[NFTA_SET_ELEM_USERDATA], &len)))
			return 0;
		if (grow((void **)&d->labels, &d->labels_cap, d->n_labels + 1, sizeof(*label)))
			return -ENOMEM;
		label = &d->labels[d->n_labels++];
		label->dest = dest;
		label->text_len = len < sizeof(label->text) ? len : sizeof(label->text) - 1;
		memcpy(label->text, text, label->text_len);
		return 0;
	}
	/* One expression comes alone; several come as a list. */
	if (tb[NFTA_SET_ELEM_EXPR]) {
		found = counter_expr(tb[NFTA_SET_ELEM_EXPR], &packets, &bytes);
	} else if (tb[NFTA_SET_ELEM_EXPRESSIONS]) {
		nla_for_each_nested(expr, tb[NFTA_SET_ELEM_EXPRESSIONS], left)
			if ((found = counter_expr(expr, &packets, &bytes)))
				break;
	}
	if (!found)
		return -EPROTO; /* a set without counters */
	in_index = name_index(d, in);
	out_index = in_index < 0 ? in_index : name_index(d, out);
	if (out_index < 0)
		return (int)out_index;
	if (grow((void **)&d->recs, &d->recs_cap, d->n_recs + 1, sizeof(*d->recs)))
		return -ENOMEM;
	d->recs[d->n_recs++] = (struct usage_rec){
		(uint32_t)in_index, (uint32_t)out_index, d->set, dest, packets, bytes
	};
	return 0;
}

static void parse_setelem_msg(struct usage_dump *d, const struct nlmsghdr *nlh)
{
	const struct nlattr *tb[NFTA_SET_ELEM_LIST_MAX + 1], *elem;
	size_t hdr = NLMSG_LENGTH(sizeof(struct nfgenmsg)), left;
	int rc;

	if (nlh->nlmsg_len < hdr)
		return;
	nla_parse(tb, NFTA_SET_ELEM_LIST_MAX, (const char *)nlh + NLMSG_ALIGN(hdr),
		  nlh->nlmsg_len - NLMSG_ALIGN(hdr));
	if (!tb[NFTA_SET_ELEM_LIST_ELEMENTS])
		return;
	nla_for_each_nested(elem, tb[NFTA_SET_ELEM_LIST_ELEMENTS], left) {
		rc = parse_elem(d, elem);
		if (rc && !d->rc)
			d->rc = rc;
	}
}

static int put_attr(char *buf, size_t *off, size_t cap, uint16_t type, const char *s)
{
	size_t n = strlen(s) + 1;
	struct nlattr nla = { .nla_len = (uint16_t)(NLA_HDRLEN + n), .nla_type = type };

	if (n > 256 || *off + NLA_ALIGN(nla.nla_len) > cap)
		return -ENAMETOOLONG;
	memcpy(buf + *off, &nla, sizeof(nla));
	memset(buf + *off + NLA_HDRLEN, 0, NLA_ALIGN(nla.nla_len) - NLA_HDRLEN);
	memcpy(buf + *off + NLA_HDRLEN, s, n);
	*off += NLA_ALIGN(nla.nla_len);
	return 0;
}

/* Dumps one set into d; 0 or -errno. The socket is always left drained, so
 * the next dump can start. */
static int usage_read(struct meshdp_ctx *ctx, const char *table, const char *set,
		      struct usage_dump *d)
{
	char req[1024] __attribute__((aligned(4)));
	struct nlmsghdr *nlh = (struct nlmsghdr *)req;
	struct nfgenmsg *nfg;
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	size_t off = NLMSG_ALIGN(NLMSG_LENGTH(sizeof(*nfg)));
	char *buf;
	ssize_t n;
	int rc = 0, done = 0, intr = 0, err;

	memset(req, 0, off);
	nfg = NLMSG_DATA(nlh);
	nfg->nfgen_family = NFPROTO_INET;
	nfg->version = NFNETLINK_V0;
	if (put_attr(req, &off, sizeof(req), NFTA_SET_ELEM_LIST_TABLE, table) ||
	    put_attr(req, &off, sizeof(req), NFTA_SET_ELEM_LIST_SET, set))
		return -ENAMETOOLONG;
	nlh->nlmsg_len = off;
	nlh->nlmsg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM;
	nlh->nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
	nlh->nlmsg_seq = ++ctx->seq;
	buf = malloc(RECV_LEN);
	if (!buf)
		return -ENOMEM;
	if (sendto(ctx->nl, req, off, 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0) {
		free(buf);
		return -errno;
	}
	while (!done) {
		n = recv(ctx->nl, buf, RECV_LEN, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			rc = -errno;
			break;
		}
		for (nlh = (struct nlmsghdr *)buf; NLMSG_OK(nlh, (size_t)n); nlh = NLMSG_NEXT(nlh, n)) {
			if (nlh->nlmsg_seq != ctx->seq)
				continue; /* left over from an earlier request */
			if (nlh->nlmsg_flags & NLM_F_DUMP_INTR)
				intr = 1;
			if (nlh->nlmsg_type == NLMSG_DONE) {
				done = 1;
			} else if (nlh->nlmsg_type == NLMSG_ERROR) {
				err = ((struct nlmsgerr *)NLMSG_DATA(nlh))->error;
				if (err && !rc)
					rc = err;
				done = 1;
			} else if (nlh->nlmsg_len >= NLMSG_LENGTH(sizeof(*nfg))) {
				/* res_id: the low 16 bits of the ruleset generation */
				nfg = NLMSG_DATA(nlh);
				if (d->generation < 0)
					d->generation = ntohs(nfg->res_id);
				else if (d->generation != ntohs(nfg->res_id))
					d->changed = 1;
				if (!rc)
					parse_setelem_msg(d, nlh);
			}
		}
	}
	free(buf);
	if (!rc)
		rc = d->rc;
	/* A transaction committed during the dump: the caller reads again. */
	if (!rc && (intr || d->changed))
		rc = -EINTR;
	return rc;
}

static uint32_t dest_hash(const struct dest *dest)
{
	uint32_t h = 2166136261u ^ dest->size, i;

	for (i = 0; i < dest->size; i++)
		h = (h ^ dest->bytes[i]) * 16777619u;
	return h;
}

/* Destination index of each label (0 for "other"), and a hash to find them. */
struct dest_index {
	uint32_t *slots, n_slots; /* label position + 1, 0 = free */
	uint32_t *index;	  /* by label position */
};

static uint32_t dest_lookup(const struct usage_dump *d, const struct dest_index *x,
			    const struct dest *dest)
{
	uint32_t j, pos;

	if (dest_len_field(dest) == OTHER_LEN)
		return 0;
	for (j = dest_hash(dest) & (x->n_slots - 1); x->slots[j]; j = (j + 1) & (x->n_slots - 1)) {
		pos = x->slots[j] - 1;
		if (d->labels[pos].dest.size == dest->size &&
		    !memcmp(d->labels[pos].dest.bytes, dest->bytes, dest->size))
			return x->index[pos];
	}
	return UINT32_MAX;
}

static int index_labels(const struct usage_dump *d, struct dest_index *x, uint32_t *n_dests)
{
	uint32_t pos, j;

	x->n_slots = 16;
	while (x->n_slots < 2 * d->n_labels)
		x->n_slots *= 2;
	x->slots = calloc(x->n_slots, sizeof(*x->slots));
	x->index = calloc(d->n_labels + 1, sizeof(*x->index));
	if (!x->slots || !x->index)
		return -ENOMEM;
	*n_dests = 1;
	for (pos = 0; pos < d->n_labels; pos++) {
		if (dest_len_field(&d->labels[pos].dest) == OTHER_LEN)
			continue;
		x->index[pos] = (*n_dests)++;
		for (j = dest_hash(&d->labels[pos].dest) & (x->n_slots - 1); x->slots[j];
		     j = (j + 1) & (x->n_slots - 1))
			;
		x->slots[j] = pos + 1;
	}
	return 0;
}

static int usage_layout(struct usage_dump *d, char **out, size_t *out_len)
{
	struct usage_header h = { .version = 2, .n_names = d->n_names, .n_keys = (uint32_t)d->n_recs };
	size_t counters_len, names_len = (size_t)d->n_names * NAME_LEN, labels_len = 0, total, i;
	struct dest_index x = { 0 };
	const struct usage_label *label;
	const struct usage_rec *r;
	struct usage_key *key;
	uint64_t *counters, *slot;
	uint32_t index, padded;
	char *buf = NULL, *p;
	int rc;

	rc = index_labels(d, &x, &h.n_dests);
	if (rc)
		goto out;
	rc = -EOVERFLOW;
	if (__builtin_mul_overflow((size_t)d->n_names * h.n_dests, 4 * sizeof(uint64_t),
				   &counters_len))
		goto out;
	for (label = d->labels; label < d->labels + d->n_labels; label++)
		labels_len += 8 + ((label->text_len + 3) & ~3u);
	h.labels_len = (uint32_t)labels_len;
	total = sizeof(h) + names_len + counters_len + labels_len + d->n_recs * sizeof(*key);
	rc = -ENOMEM;
	buf = calloc(1, total);
	if (!buf)
		goto out;
	memcpy(buf + sizeof(h), d->names, names_len);
	counters = (uint64_t *)(buf + sizeof(h) + names_len);
	p = buf + sizeof(h) + names_len + counters_len;
	for (i = 0; i < d->n_labels; i++) {
		label = &d->labels[i];
		index = dest_len_field(&label->dest) == OTHER_LEN ? 0 : x.index[i];
		padded = (label->text_len + 3) & ~3u;
		memcpy(p, &index, 4);
		memcpy(p + 4, &label->text_len, 4);
		memcpy(p + 8, label->text, label->text_len);
		p += 8 + padded;
	}
	key = (struct usage_key *)p;
	for (r = d->recs; r < d->recs + d->n_recs; r++, key++) {
		index = dest_lookup(d, &x, &r->dest);
		key->in = r->in;
		key->out = r->out;
		key->set = r->set;
		key->dest = index;
		key->family = r->dest.size == 20 ? 6 : 4;
		key->prefix_len = dest_len_field(&r->dest);
		memcpy(key->addr, r->dest.bytes, r->dest.size - 4);
		if (index == UINT32_MAX) {
			h.n_stale++; /* its destination was removed */
			continue;
		}
		slot = counters + ((size_t)r->in * h.n_dests + index) * 4;
		slot[0] += r->packets;
		slot[1] += r->bytes;
		slot = counters + ((size_t)r->out * h.n_dests + index) * 4;
		slot[2] += r->packets;
		slot[3] += r->bytes;
	}
	memcpy(buf, &h, sizeof(h));
	*out = buf;
	*out_len = total;
	buf = NULL;
	rc = 0;
out:
	free(buf);
	free(x.slots);
	free(x.index);
	return rc;
}

/* Forwarded counters (meshbpf) as records of set n_sets; interfaces by name. */
#define FAST_IDS 4096 /* interface ids (or raw ifindexes) below this are cached */

struct forwarded {
	struct usage_dump *d;
	struct meshbpf *bpf;
	/* name index + 1 by interface id, and by ifindex of raw ids; 0 = not yet */
	int64_t index[FAST_IDS], raw[FAST_IDS];
};

static int64_t interface_name(struct forwarded *f, uint32_t id)
{
	uint32_t small = id & ~MESHBPF_RAW;
	int64_t *cached = small < FAST_IDS ? &(id & MESHBPF_RAW ? f->raw : f->index)[small] : NULL;
	char name[NAME_LEN];
	int64_t i;

	if (cached && *cached)
		return *cached - 1;
	meshbpf_name(f->bpf, id, name);
	if (!name[0]) /* gone before its name was ever seen */
		snprintf(name, NAME_LEN, "#%u", id & ~MESHBPF_RAW);
	i = name_index(f->d, name);
	if (i >= 0 && cached)
		*cached = i + 1;
	return i;
}

static int forwarded_rec(void *arg, const struct meshbpf_key *k, const struct meshbpf_value *v)
{
	struct forwarded *f = arg;
	struct usage_rec *r;
	int64_t in, out;
	size_t size = k->family == 6 ? 16 : 4;

	in = interface_name(f, k->in);
	out = in < 0 ? in : interface_name(f, k->out);
	if (out < 0)
		return (int)out;
	if (grow((void **)&f->d->recs, &f->d->recs_cap, f->d->n_recs + 1, sizeof(*r)))
		return -ENOMEM;
	r = &f->d->recs[f->d->n_recs++];
	memset(r, 0, sizeof(*r));
	r->in = (uint32_t)in;
	r->out = (uint32_t)out;
	r->set = f->d->set;
	r->dest.size = (uint32_t)size + 4; /* laid out like an nft usage key's */
	memcpy(r->dest.bytes, k->addr, size);
	memcpy(r->dest.bytes + size, &k->len, 4);
	r->packets = v->packets;
	r->bytes = v->bytes;
	return 0;
}

/* Makes sure the forwarded counters are open: finds them in the namespace. */
static int bpf_ready(struct meshdp_ctx *ctx)
{
	return ctx->bpf.usage >= 0 ? 0 : meshbpf_open(&ctx->bpf, 0, NULL, 0);
}

/* Reads the n_sets shards `sets` of table `table` (family inet), and with
 * `forwarded` the eBPF counters of forwarded traffic (after attaching to
 * interfaces new since the last read), as records of set index n_sets.
 * Returns 0, or -errno: -EINTR if a transaction committed meanwhile (read
 * again), -EPROTO if a set is not a usage set, -ENOENT if one is missing
 * (or the eBPF counters are). */
int meshdp_usage_dump(struct meshdp_ctx *ctx, const char *table, const char *const *sets,
		      unsigned int n_sets, const char *label, int forwarded, char **out,
		      size_t *out_len)
{
	struct usage_dump d = { .generation = -1 };
	struct forwarded *f = NULL;
	int rc = 0;

	*out = NULL;
	*out_len = 0;
	if (strlen(label) >= NAME_LEN)
		return -EINVAL;
	strncpy(d.label, label, NAME_LEN);
	for (d.set = 0; d.set < n_sets && !rc; d.set++)
		rc = usage_read(ctx, table, sets[d.set], &d);
	if (!rc && forwarded) {
		rc = bpf_ready(ctx);
		if (!rc)
			rc = meshbpf_sweep(&ctx->bpf, 0);
		if (!rc && !(f = calloc(1, sizeof(*f))))
			rc = -ENOMEM;
		if (!rc) {
			f->d = &d;
			f->bpf = &ctx->bpf;
			d.set = n_sets;
			rc = meshbpf_read(&ctx->bpf, forwarded_rec, f);
		}
	}
	if (!rc)
		rc = usage_layout(&d, out, out_len);
	free(f);
	free(d.names);
	free(d.slots);
	free(d.recs);
	free(d.labels);
	return rc;
}

/*
 * The forwarded counters' own calls (see meshbpf.h). Each returns 0 or
 * -errno; those that need the counters find them first (-ENOENT if there
 * are none).
 */

/* Finds the counters (create == 0) or makes them anew; log gets the
 * verifier's complaint if a program does not load. */
int meshdp_bpf_open(struct meshdp_ctx *ctx, int create, char *log, size_t log_len)
{
	return meshbpf_open(&ctx->bpf, create, log, log_len);
}

/* Attaches to every interface again (force) or to those new since the last
 * sweep. */
int meshdp_bpf_sweep(struct meshdp_ctx *ctx, int force)
{
	int rc = bpf_ready(ctx);

	return rc ? rc : meshbpf_sweep(&ctx->bpf, force);
}

int meshdp_bpf_prefixes(struct meshdp_ctx *ctx, const struct meshbpf_prefix *wanted,
			unsigned int n)
{
	int rc = bpf_ready(ctx);

	return rc ? rc : meshbpf_prefixes(&ctx->bpf, wanted, n);
}

/* Deletes an interface's counters, or (name NULL) those of removed
 * prefixes; returns how many. */
int meshdp_bpf_delete(struct meshdp_ctx *ctx, const char *name)
{
	int rc = bpf_ready(ctx);

	return rc ? rc : meshbpf_delete(&ctx->bpf, name);
}

/* The counters' map (for tests and benchmarks that fill it). */
int meshdp_bpf_usage_fd(struct meshdp_ctx *ctx)
{
	int rc = bpf_ready(ctx);

	return rc ? rc : ctx->bpf.usage;
}
