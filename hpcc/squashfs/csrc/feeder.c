/* The feeder: one thread that alone calls the block processor's file functions
   (begin_file, append, end_file), so that the Python side hands file data over and goes on,
   and the block processor (with its worker pool) runs in a tight loop over batches as in
   tar2sqfs instead of a thread hand-off per small file. Data is copied into a queue bounded
   by QUEUE_MAX_BYTES; an error of the block processor is kept and returned by the next
   push or sync. */
#include "hpcc_sqfs.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>

#define QUEUE_MAX_BYTES (64u << 20)   /* the Python side blocks beyond this much queued data */
#define WAKE_BYTES (4u << 20)         /* wake the feeder once this much is queued ... */
#define WAKE_JOBS 256                 /* ... or this many jobs */

typedef struct job {
    struct job *next;
    sqfs_inode_generic_t **cell;
    size_t size;
    int flags;
    unsigned char data[];
} job_t;

static void *feeder_main(void *arg)
{
    feeder_t *f = arg;
    job_t *j;
    int ret, st;

    pthread_mutex_lock(&f->mtx);
    for (;;) {
        while (f->head == NULL && !f->stop) {
            f->feeder_waiting = 1;
            pthread_cond_wait(&f->work_cond, &f->mtx);
            f->feeder_waiting = 0;
        }
        if (f->stop)
            break;
        j = f->head;
        f->head = j->next;
        if (f->head == NULL)
            f->tail = NULL;
        f->queued_jobs -= 1;
        f->queued_bytes -= j->size;
        st = f->status;
        pthread_mutex_unlock(&f->mtx);

        ret = 0;
        if (st == 0) {
            if (j->flags & FEED_BEGIN)
                ret = sqfs_block_processor_begin_file(f->proc, j->cell, NULL, 0);
            if (ret == 0 && j->size > 0)
                ret = sqfs_block_processor_append(f->proc, j->data, j->size);
            if (ret == 0 && (j->flags & FEED_END))
                ret = sqfs_block_processor_end_file(f->proc);
        }
        free(j);

        pthread_mutex_lock(&f->mtx);
        if (ret != 0 && f->status == 0)
            f->status = ret;
        f->pending -= 1;
        if (f->producer_waiting)
            pthread_cond_broadcast(&f->space_cond);
    }
    pthread_mutex_unlock(&f->mtx);
    return NULL;
}

int feeder_start(feeder_t *f, sqfs_block_processor_t *proc)
{
    sigset_t all, old;
    int ret;

    f->proc = proc;
    if (pthread_mutex_init(&f->mtx, NULL) != 0)
        return SQFS_ERROR_INTERNAL;
    if (pthread_cond_init(&f->work_cond, NULL) != 0) {
        pthread_mutex_destroy(&f->mtx);
        return SQFS_ERROR_INTERNAL;
    }
    if (pthread_cond_init(&f->space_cond, NULL) != 0) {
        pthread_cond_destroy(&f->work_cond);
        pthread_mutex_destroy(&f->mtx);
        return SQFS_ERROR_INTERNAL;
    }
    f->ready = 1;
    /* the feeder must not take the signals meant for the Python main thread */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    ret = pthread_create(&f->thread, NULL, feeder_main, f);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (ret != 0)
        return SQFS_ERROR_INTERNAL;   /* feeder_stop frees what was set up */
    f->started = 1;
    return 0;
}

/* With f->mtx held: wake the feeder if it sleeps, then sleep until it has finished a job
 * (it broadcasts space_cond then, producer_waiting being set). Callers loop on their own
 * condition, which covers spurious wakeups. */
static void wait_for_feeder(feeder_t *f)
{
    if (f->feeder_waiting)
        pthread_cond_signal(&f->work_cond);
    f->producer_waiting = 1;
    pthread_cond_wait(&f->space_cond, &f->mtx);
    f->producer_waiting = 0;
}

/* Queue one step of file data for the feeder; returns an earlier feeder error, if any. */
int feeder_push(feeder_t *f, sqfs_inode_generic_t **cell, const void *data, size_t size,
                int flags)
{
    job_t *j = malloc(sizeof(*j) + size);
    int ret;

    if (j == NULL)
        return SQFS_ERROR_ALLOC;
    j->next = NULL;
    j->cell = cell;
    j->size = size;
    j->flags = flags;
    if (size > 0)
        memcpy(j->data, data, size);

    pthread_mutex_lock(&f->mtx);
    while (f->status == 0 && f->queued_bytes > 0 && f->queued_bytes + size > QUEUE_MAX_BYTES) {
        wait_for_feeder(f);
    }
    ret = f->status;
    if (ret == 0) {
        if (f->tail == NULL)
            f->head = j;
        else
            f->tail->next = j;
        f->tail = j;
        f->queued_bytes += size;
        f->queued_jobs += 1;
        f->pending += 1;
        if (f->feeder_waiting &&
            (f->queued_bytes >= WAKE_BYTES || f->queued_jobs >= WAKE_JOBS))
            pthread_cond_signal(&f->work_cond);
    }
    pthread_mutex_unlock(&f->mtx);
    if (ret != 0)
        free(j);
    return ret;
}

/* Wait until the feeder has handed everything queued to the block processor. */
int feeder_sync(feeder_t *f)
{
    int ret;
    pthread_mutex_lock(&f->mtx);
    while (f->pending > 0) {
        wait_for_feeder(f);
    }
    ret = f->status;
    pthread_mutex_unlock(&f->mtx);
    return ret;
}

void feeder_stop(feeder_t *f)
{
    job_t *j;
    if (!f->ready)
        return;
    if (f->started) {
        pthread_mutex_lock(&f->mtx);
        f->stop = 1;
        pthread_cond_broadcast(&f->work_cond);
        pthread_mutex_unlock(&f->mtx);
        pthread_join(f->thread, NULL);
        f->started = 0;
    }
    while (f->head != NULL) {
        j = f->head;
        f->head = j->next;
        free(j);
    }
    f->tail = NULL;
    pthread_cond_destroy(&f->space_cond);
    pthread_cond_destroy(&f->work_cond);
    pthread_mutex_destroy(&f->mtx);
    f->ready = 0;
}
