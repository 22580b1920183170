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
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <nftables/libnftables.h>

struct meshdp_ctx {
	struct nft_ctx *nft;
};

/* nft_ctx_new opens the netlink socket, so the socket (and every command run
 * through the context later) belongs to the namespace current at that moment.
 * setns() switches only the calling thread. */
static struct nft_ctx *nft_ctx_new_in(const char *netns_path)
{
	struct nft_ctx *nft;
	int home, target, saved;

	if (!netns_path)
		return nft_ctx_new(NFT_CTX_DEFAULT);

	target = open(netns_path, O_RDONLY | O_CLOEXEC);
	if (target < 0)
		return NULL;
	home = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	if (home < 0) {
		saved = errno;
		close(target);
		errno = saved;
		return NULL;
	}
	if (setns(target, CLONE_NEWNET) < 0) {
		saved = errno;
		close(home);
		close(target);
		errno = saved;
		return NULL;
	}
	nft = nft_ctx_new(NFT_CTX_DEFAULT);
	saved = errno;
	/* Going back to a namespace we hold open cannot fail in practice; if it
	 * did, this thread would silently act on the wrong namespace from now
	 * on, which is worse than stopping. */
	if (setns(home, CLONE_NEWNET) < 0)
		abort();
	close(home);
	close(target);
	errno = saved;
	return nft;
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
	ctx->nft = nft_ctx_new_in(netns_path);
	if (!ctx->nft)
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
	free(ctx);
	errno = saved;
	return NULL;
}

void meshdp_ctx_free(struct meshdp_ctx *ctx)
{
	if (!ctx)
		return;
	nft_ctx_free(ctx->nft);
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
