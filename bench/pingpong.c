/* MPI ping-pong between ranks 0 and 1: latency and bandwidth.
 *
 *   pingpong [--maps] [iterations] [max_bytes]
 *
 * Every message is checked (a real exchange, not just timing). Rank 0 prints one line per
 * message size: "size <bytes> lat_us <one-way latency> bw_MBps <bandwidth>", then
 * "pingpong ok ranks <n>". With --maps each rank first prints the /proc/self/maps lines of
 * the MPI library it runs with ("maps <rank> <line>"), so a test can tell whose file it is.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void print_maps(int rank)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[4096];
    if (!f) {
        printf("maps %d unavailable\n", rank);
        return;
    }
    while (fgets(line, sizeof line, f))
        if (strstr(line, "libmpi"))
            printf("maps %d %s", rank, line);
    fclose(f);
}

int main(int argc, char **argv)
{
    int rank, size, maps = 0, a = 1;
    long iters = 1000, maxbytes = 1 << 22;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (a < argc && strcmp(argv[a], "--maps") == 0) { maps = 1; a++; }
    if (a < argc) iters = atol(argv[a++]);
    if (a < argc) maxbytes = atol(argv[a++]);
    if (maps) { print_maps(rank); fflush(stdout); }
    if (size < 2) {
        if (rank == 0) fprintf(stderr, "pingpong needs 2 ranks\n");
        MPI_Finalize();
        return 2;
    }
    char *buf = malloc(maxbytes > 0 ? maxbytes : 1);
    /* warm-up: connection set-up and first-touch costs stay out of the figures */
    for (long i = 0; i < 1000; i++) {
        if (rank == 0) {
            MPI_Send(buf, 1, MPI_CHAR, 1, 1, MPI_COMM_WORLD);
            MPI_Recv(buf, 1, MPI_CHAR, 1, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else if (rank == 1) {
            MPI_Recv(buf, 1, MPI_CHAR, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            MPI_Send(buf, 1, MPI_CHAR, 0, 1, MPI_COMM_WORLD);
        }
    }
    for (long bytes = 1; bytes <= maxbytes; bytes *= 4) {
        long n = bytes >= (1 << 20) ? (iters / 10 > 10 ? iters / 10 : 10) : iters;
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        for (long i = 0; i < n + 10; i++) {
            if (i == 10) { MPI_Barrier(MPI_COMM_WORLD); t0 = MPI_Wtime(); } /* warm-up */
            if (rank == 0) {
                memset(buf, (int)(i & 0x7f), bytes);
                MPI_Send(buf, bytes, MPI_CHAR, 1, 0, MPI_COMM_WORLD);
                MPI_Recv(buf, bytes, MPI_CHAR, 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                if (buf[bytes - 1] != (char)((i & 0x7f) + 1)) {
                    fprintf(stderr, "pingpong: bad reply at size %ld\n", bytes);
                    MPI_Abort(MPI_COMM_WORLD, 3);
                }
            } else if (rank == 1) {
                MPI_Recv(buf, bytes, MPI_CHAR, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                buf[bytes - 1] += 1;
                MPI_Send(buf, bytes, MPI_CHAR, 0, 0, MPI_COMM_WORLD);
            }
        }
        double dt = MPI_Wtime() - t0;
        if (rank == 0)
            printf("size %ld lat_us %.3f bw_MBps %.1f\n", bytes, dt / n / 2 * 1e6,
                   2.0 * n * bytes / dt / 1e6);
    }
    if (rank == 0) printf("pingpong ok ranks %d\n", size);
    free(buf);
    MPI_Finalize();
    return 0;
}
