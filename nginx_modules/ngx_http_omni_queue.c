/*
 * Omni Proxy nginx module: the holding queues, as a data structure.
 *
 * Two ordered queues over one pool of entries in the shared zone (prefill:
 * every mode; decode: sequential mode after its prefill).  A queue is a
 * binary heap of entry numbers ordered by `key` (smaller first: the key is
 * made by the decisions, ngx_http_omni_sched.c) plus a list in arrival
 * order, so the oldest request is found at once when it has waited past the
 * starvation timeout.  Nothing here answers a client or decides where a
 * request goes; callers hold the zone lock.
 */


#include "ngx_http_omni.h"


static void ngx_http_omni_heap_push(ngx_http_omni_shctx_t *sh,
    ngx_http_omni_queue_t *q, uint32_t e);
static void ngx_http_omni_heap_remove(ngx_http_omni_shctx_t *sh,
    ngx_http_omni_queue_t *q, uint32_t pos);


static ngx_inline ngx_uint_t
ngx_http_omni_before(ngx_http_omni_shctx_t *sh, uint32_t a, uint32_t b)
{
    return omni_policy_queue_before(sh->entries[a].key, sh->entries[a].seq,
                                    sh->entries[b].key, sh->entries[b].seq);
}


static void
ngx_http_omni_heap_push(ngx_http_omni_shctx_t *sh, ngx_http_omni_queue_t *q,
    uint32_t e)
{
    uint32_t  pos, parent;

    pos = q->n;

    while (pos > 0) {
        parent = (pos - 1) / 2;

        if (!ngx_http_omni_before(sh, e, q->heap[parent])) {
            break;
        }

        q->heap[pos] = q->heap[parent];
        sh->entries[q->heap[pos]].heap_pos = pos;
        pos = parent;
    }

    q->heap[pos] = e;
    sh->entries[e].heap_pos = pos;
}


/* remove heap[pos]; q->n already counts one less */
static void
ngx_http_omni_heap_remove(ngx_http_omni_shctx_t *sh, ngx_http_omni_queue_t *q,
    uint32_t pos)
{
    uint32_t  last, child, parent;

    if (pos == q->n) {
        return;
    }

    last = q->heap[q->n];

    /* sift up */

    while (pos > 0) {
        parent = (pos - 1) / 2;

        if (!ngx_http_omni_before(sh, last, q->heap[parent])) {
            break;
        }

        q->heap[pos] = q->heap[parent];
        sh->entries[q->heap[pos]].heap_pos = pos;
        pos = parent;
    }

    /* sift down */

    for ( ;; ) {
        child = 2 * pos + 1;

        if (child >= q->n) {
            break;
        }

        if (child + 1 < q->n
            && ngx_http_omni_before(sh, q->heap[child + 1], q->heap[child]))
        {
            child++;
        }

        if (!ngx_http_omni_before(sh, q->heap[child], last)) {
            break;
        }

        q->heap[pos] = q->heap[child];
        sh->entries[q->heap[pos]].heap_pos = pos;
        pos = child;
    }

    q->heap[pos] = last;
    sh->entries[last].heap_pos = pos;
}


/* Take a waiting entry out of its queue (it stays allocated). */
void
ngx_http_omni_queue_remove_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, uint32_t e)
{
    ngx_http_omni_queue_t   *q;
    ngx_http_omni_qentry_t  *en;

    en = &sh->entries[e];
    q = &sh->queues[en->queue];

    if (en->heap_pos == 0) {
        /* a new head: the decisions about the queue are stale (fewer
         * waiting is checked by each kept decision) */
        sh->sched_epoch++;
    }

    q->n--;
    ngx_http_omni_heap_remove(sh, q, en->heap_pos);

    q->work_us -= ngx_min(q->work_us, en->work_us);
    if (en->deadline_us) {
        q->n_slo--;
    }

    if (q->n == 0) {
        /* no key left to agree with: the next ones use the full aging */
        q->key_backlog_us = 0;
    }

    if (en->prev != NGX_HTTP_OMNI_NONE) {
        sh->entries[en->prev].next = en->next;
    } else {
        q->head = en->next;
    }

    if (en->next != NGX_HTTP_OMNI_NONE) {
        sh->entries[en->next].prev = en->prev;
    } else {
        q->tail = en->prev;
    }

    en->prev = NGX_HTTP_OMNI_NONE;
    en->next = NGX_HTTP_OMNI_NONE;
}


void
ngx_http_omni_entry_free_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, uint32_t e)
{
    ngx_http_omni_qentry_t  *en;

    en = &sh->entries[e];

    if (en->state != NGX_HTTP_OMNI_QE_FREE) {
        /* how often the scheduler decided about it while it was held */
        sh->held_decided += en->decided;
        sh->held_finished++;
        sh->held_decided_max = ngx_max(sh->held_decided_max, en->decided);
    }

    if (en->hashes) {
        ngx_slab_free_locked(shpool, en->hashes);
    }

    ngx_memzero(en, sizeof(ngx_http_omni_qentry_t));
    en->state = NGX_HTTP_OMNI_QE_FREE;
    en->next = sh->q_free;
    sh->q_free = e;
}




/* A free entry, zeroed, with no queue yet; NGX_HTTP_OMNI_NONE: full. */
uint32_t
ngx_http_omni_entry_alloc_locked(ngx_http_omni_shctx_t *sh, ngx_uint_t max)
{
    uint32_t                 e;
    ngx_http_omni_qentry_t  *en;

    e = sh->q_free;

    if (e == NGX_HTTP_OMNI_NONE
        || sh->queues[NGX_HTTP_OMNI_Q_PREFILL].n
           + sh->queues[NGX_HTTP_OMNI_Q_DECODE].n >= max)
    {
        return NGX_HTTP_OMNI_NONE;
    }

    en = &sh->entries[e];
    sh->q_free = en->next;

    ngx_memzero(en, sizeof(ngx_http_omni_qentry_t));

    en->seq = ++sh->q_seq;
    en->slot[0] = NGX_HTTP_OMNI_NONE;
    en->slot[1] = NGX_HTTP_OMNI_NONE;

    return e;
}


/* Put entry e (its queue and key set) in its queue: by key and last in
 * arrival order. */
void
ngx_http_omni_queue_insert_locked(ngx_http_omni_shctx_t *sh, uint32_t e)
{
    ngx_http_omni_queue_t   *q;
    ngx_http_omni_qentry_t  *en;

    en = &sh->entries[e];
    q = &sh->queues[en->queue];

    ngx_http_omni_heap_push(sh, q, e);
    q->n++;

    if (q->heap[0] == e) {
        /* a new head: the decisions about the queue are stale */
        sh->sched_epoch++;
    }

    /* what the drain (Retry-After) and the SLO release need */
    q->work_us += en->work_us;
    if (en->deadline_us) {
        q->n_slo++;
    }

    en->prev = q->tail;
    en->next = NGX_HTTP_OMNI_NONE;

    if (q->tail != NGX_HTTP_OMNI_NONE) {
        sh->entries[q->tail].next = e;
    } else {
        q->head = e;
    }

    q->tail = e;
}


/* Restore queue q's heap after its entries' keys changed (the ties in
 * arrival order, as at insertion). */
void
ngx_http_omni_queue_reorder_locked(ngx_http_omni_shctx_t *sh, ngx_uint_t q)
{
    uint32_t                e;
    ngx_http_omni_queue_t  *queue;

    queue = &sh->queues[q];
    e = queue->head;

    for (queue->n = 0; e != NGX_HTTP_OMNI_NONE; queue->n++) {
        ngx_http_omni_heap_push(sh, queue, e);
        e = sh->entries[e].next;
    }
}


/*
 * The first `max` entries of queue q in its order (at most max, fewer when
 * fewer wait), into out[]; returns how many.  The heap's array is not in
 * order past its root (heap[1] may come after heap[5]): a best-first walk
 * from the root finds them, each next one among the children of those
 * taken (max + 1 positions in view at most).
 */
ngx_uint_t
ngx_http_omni_queue_firsts_locked(ngx_http_omni_shctx_t *sh, ngx_uint_t q,
    uint32_t *out, ngx_uint_t max)
{
    uint32_t                pos, child, front[NGX_HTTP_OMNI_FIRSTS_MAX + 1];
    ngx_uint_t              n, m, i, best;
    ngx_http_omni_queue_t  *queue;

    queue = &sh->queues[q];
    max = ngx_min(max, NGX_HTTP_OMNI_FIRSTS_MAX);

    if (queue->n == 0 || max == 0) {
        return 0;
    }

    front[0] = 0;
    m = 1;

    for (n = 0; n < max && m > 0; n++) {
        best = 0;

        for (i = 1; i < m; i++) {
            if (ngx_http_omni_before(sh, queue->heap[front[i]],
                                     queue->heap[front[best]]))
            {
                best = i;
            }
        }

        pos = front[best];
        out[n] = queue->heap[pos];
        front[best] = front[--m];

        for (child = 2 * pos + 1; child <= 2 * pos + 2; child++) {
            if (child < queue->n) {
                front[m++] = child;
            }
        }
    }

    return n;
}


/*
 * Give back what dead processes held: their queue entries (waiting ones
 * leave the queue; the charges of released ones, in their owner's list or
 * bound after it was reaped, are unbound), then through the ledger their
 * legs' charges and requests.  `starting`: see ngx_http_omni_ledger_dead().
 * Returns the number of dead owners found.
 */
ngx_uint_t
ngx_http_omni_queue_reap_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, ngx_uint_t starting)
{
    uint32_t                 e;
    ngx_uint_t               i, t, dead;
    ngx_http_omni_qentry_t  *en;

    dead = 0;

    for (i = 0; i < NGX_HTTP_OMNI_OWNERS; i++) {
        if (sh->owners[i].pid != ngx_http_omni_ledger_self()
            && ngx_http_omni_ledger_dead(sh->owners[i].pid, starting))
        {
            dead++;
        }
    }

    if (dead == 0 && !starting) {
        /* the entries of a dead process are reaped with its owner record */
        return 0;
    }

    for (e = 0; e < sh->q_cap; e++) {
        en = &sh->entries[e];

        if (en->state == NGX_HTTP_OMNI_QE_FREE
            || en->pid == ngx_http_omni_ledger_self()
            || !ngx_http_omni_ledger_dead(en->pid, starting))
        {
            continue;
        }

        if (en->state == NGX_HTTP_OMNI_QE_WAITING) {
            ngx_http_omni_queue_remove_locked(sh, shpool, e);
        }

        for (t = 0; t < NGX_HTTP_OMNI_TIERS; t++) {
            if (en->charge[t]) {
                ngx_http_omni_ledger_unbind_locked(sh, shpool, en->charge[t]);
                en->charge[t] = NULL;
            }
        }

        ngx_http_omni_entry_free_locked(sh, shpool, e);
    }

    return ngx_http_omni_ledger_reap_locked(sh, shpool, starting);
}


/* Entry e was released for a worker other than this process: note it for
 * the owner's wake-up. */
void
ngx_http_omni_wake_push_locked(ngx_http_omni_shctx_t *sh, uint32_t e)
{
    ngx_http_omni_wake_t    *w;
    ngx_http_omni_qentry_t  *en;

    en = &sh->entries[e];

    if (en->worker >= NGX_HTTP_OMNI_MAX_WORKERS) {
        return;
    }

    w = &sh->wake[en->worker];

    if (w->n == NGX_HTTP_OMNI_WAKE_RING) {
        w->overflow = 1;
        return;
    }

    w->entry[w->n] = e;
    w->seq[w->n] = (uint32_t) en->seq;
    w->n++;
}


/*
 * What was released for `worker` since it last looked, into entries and
 * seqs (NGX_HTTP_OMNI_WAKE_RING each); the count, or NGX_ERROR when more
 * were released than noted (look at every held request).
 */
ngx_int_t
ngx_http_omni_wake_take(ngx_http_omni_shctx_t *sh, ngx_slab_pool_t *shpool,
    ngx_uint_t worker, uint32_t *entries, uint32_t *seqs)
{
    ngx_int_t              n;
    ngx_http_omni_wake_t  *w;

    if (worker >= NGX_HTTP_OMNI_MAX_WORKERS) {
        return NGX_ERROR;
    }

    w = &sh->wake[worker];

    ngx_shmtx_lock(&shpool->mutex);

    n = w->overflow ? NGX_ERROR : (ngx_int_t) w->n;

    if (n > 0) {
        ngx_memcpy(entries, w->entry, n * sizeof(uint32_t));
        ngx_memcpy(seqs, w->seq, n * sizeof(uint32_t));
    }

    w->n = 0;
    w->overflow = 0;

    ngx_shmtx_unlock(&shpool->mutex);

    return n;
}
