/* Quota planner for CPU tensors: the same integers as ultraep.planners.quota, bit for bit.
 *
 * The PyTorch reference runs every candidate threshold in one batch of tensor operations; here each
 * candidate runs on its own, in plain loops. The steps, their order and every integer formula follow
 * the reference (see its module docstring for the method). Six shortcuts leave the result unchanged:
 *
 * - With a copy cost above the largest rank load, when the masters-only plan misses the balance target
 *   and no resident table is given, the masters-only plan is returned without a search (see "No
 *   replica pays for its copy" below).
 * - A candidate stops when one of its rounds moves nothing: its state is then unchanged, so every
 *   later round would repeat that round.
 * - The sort keys are unique (value * num_ranks + tie-break), so a sort by key is one fixed
 *   permutation. Ranks whose value is 0 (no excess, no spare) keep ascending rank order after the
 *   ranks with a positive value, which is where the full sort puts them.
 * - After a candidate's first round only the ranks that gave or took load have a new excess or
 *   spare. The donor and receiver lines sort just those ranks and merge them into the others, which
 *   are still in order, so the lines match a full sort.
 * - The donor and receiver lines of a candidate's first round depend only on its threshold and
 *   receiver order, so the candidates of other anchors and drains with that threshold and order
 *   reuse the lines the first one sorted.
 * - With a copy cost, a candidate stops once a lower bound of its final costed peak shows that it can
 *   be neither the best plan nor a good one (see "Stopping early" below).
 *
 * Products that the reference computes in int64 are computed here in uint64 and cast back, so the
 * rare overflow wraps the same way instead of being undefined behaviour.
 *
 * Built by ultraep.kernels.native with the system C compiler and called through ctypes; it uses
 * neither Python nor PyTorch headers.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ERR_ARGS 1
#define ERR_MEMORY 2
#define ERR_VALUES 3
#define ERR_RESIDENT 4
/* The largest entry and total load the integer arithmetic supports (MAX_TOTAL_LOAD in layout.py). */
#define MAX_LOAD_BITS 35
#define MAX_TOTAL_LOAD ((int64_t)1 << MAX_LOAD_BITS)
/* Receiver orders per anchor (_RECEIVER_ORDERS in quota.py). */
#define RECEIVER_ORDERS 2
/* The anchor value that gives the j-th receiver the piece whose master has the j-th largest
 * remaining quota (_BY_MASTER_QUOTA in quota.py). */
#define BY_MASTER_QUOTA 0
/* Costed peaks are clamped here, above any total load (_COSTED_PEAK_LIMIT in quota.py). */
#define COSTED_PEAK_LIMIT ((int64_t)1 << 36)

static int64_t mul_wrap(int64_t a, int64_t b) { return (int64_t)((uint64_t)a * (uint64_t)b); }

static int64_t floor_div(int64_t a, int64_t b) {
    /* Python / torch floor division for b > 0. */
    int64_t q = a / b;
    if ((a % b != 0) && (a < 0)) q -= 1;
    return q;
}

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Merges the descending runs x[0..nx) and y[0..ny) into out and returns nx + ny. Each step is
 * branch-free, since which run wins is unpredictable. */
static int64_t merge_descending(const int64_t *x, int64_t nx, const int64_t *y, int64_t ny, int64_t *out) {
    int64_t a = 0, b = 0, k = 0;
    while (a < nx && b < ny) {
        const int64_t u = x[a], v = y[b];
        const int64_t first = u > v;
        out[k++] = first ? u : v;
        a += first;
        b += 1 - first;
    }
    while (a < nx) out[k++] = x[a++];
    while (b < ny) out[k++] = y[b++];
    return k;
}

/* Reverses x[lo..hi). */
static void reverse(int64_t *x, int64_t lo, int64_t hi) {
    for (--hi; lo < hi; ++lo, --hi) {
        const int64_t t = x[lo];
        x[lo] = x[hi];
        x[hi] = t;
    }
}

/* Puts the larger of keys[i] and keys[j] first, without a branch. */
static void order_pair(int64_t *keys, int64_t i, int64_t j) {
    const int64_t x = keys[i], y = keys[j];
    keys[i] = x > y ? x : y;
    keys[j] = x > y ? y : x;
}

/* Sorts keys[0..n) in descending order with a bottom-up merge sort; buffer has room for n more words.
 * Runs of 4 are sorted first by a 5-step network, which needs no data-dependent branch. */
static void sort_descending(int64_t *keys, int64_t n, int64_t *buffer) {
    int64_t lo = 0;
    for (; lo + 4 <= n; lo += 4) {
        order_pair(keys, lo, lo + 1);
        order_pair(keys, lo + 2, lo + 3);
        order_pair(keys, lo, lo + 2);
        order_pair(keys, lo + 1, lo + 3);
        order_pair(keys, lo + 1, lo + 2);
    }
    if (lo + 1 < n) order_pair(keys, lo, lo + 1); /* a last run of 2 or 3 */
    if (lo + 2 < n) {
        order_pair(keys, lo + 1, lo + 2);
        order_pair(keys, lo, lo + 1);
    }
    int64_t *from = keys, *to = buffer;
    for (int64_t width = 4; width < n; width *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * width) {
            const int64_t mid = min64(lo + width, n), hi = min64(lo + 2 * width, n);
            merge_descending(from + lo, mid - lo, from + mid, hi - mid, to + lo);
        }
        int64_t *swap = from;
        from = to;
        to = swap;
    }
    if (from != keys) memcpy(keys, from, (size_t)n * sizeof(int64_t));
}

/* Writes into order[0..n) the indices sorted by value[i] * n + (n - 1 - i), descending, as torch.sort
 * does on those unique keys: larger value first, lower index first on ties. The keys sorted here put
 * the value above a bit field holding n - 1 - i, which orders the same way and decodes without a
 * division. Indices with value 0 follow in ascending order, where their keys put them. Values are
 * >= 0 and below 2**(63 - bits); scratch has room for 2 * n words. Returns the number of positive values. */
static int64_t order_by_value(const int64_t *value, int64_t n, int64_t *order, int64_t *scratch) {
    int bits = 0;
    while (((int64_t)1 << bits) < n) ++bits;
    const int64_t mask = ((int64_t)1 << bits) - 1;
    /* Branch-free compaction, since the sign of value[i] is unpredictable: each pass writes every
     * entry and advances past it only when it belongs there. The zero indices gather at the front
     * of order and move behind the positive ones at the end. */
    int64_t count = 0, zeros = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t positive = value[i] > 0;
        scratch[count] = (value[i] << bits) | (n - 1 - i);
        count += positive;
        order[zeros] = i;
        zeros += 1 - positive;
    }
    memmove(order + count, order, (size_t)zeros * sizeof(int64_t));
    sort_descending(scratch, count, scratch + n);
    for (int64_t k = 0; k < count; ++k) order[k] = n - 1 - (scratch[k] & mask);
    return count;
}

/* Keeps sorted[0..*count) equal to the descending keys that order_by_value sorts for the positive
 * values, and writes their indices into order[0..*count). With num_touched < 0 it sorts all n
 * values. Otherwise only the indices in touched[] (each once, marked in is_touched[]) changed value
 * since the last call. The other keys keep their relative order, so the touched ones are sorted on
 * their own and merged in, which gives the full sort's order. scratch has room for 2 * n words. */
static void update_order(const int64_t *value, int64_t n, const int64_t *touched, int64_t num_touched,
                         const unsigned char *is_touched, int64_t *sorted, int64_t *count, int64_t *order,
                         int64_t *scratch) {
    int bits = 0;
    while (((int64_t)1 << bits) < n) ++bits;
    const int64_t mask = ((int64_t)1 << bits) - 1;
    if (num_touched < 0) {
        int64_t positive_count = 0;
        for (int64_t i = 0; i < n; ++i) {
            sorted[positive_count] = (value[i] << bits) | (n - 1 - i);
            positive_count += value[i] > 0;
        }
        sort_descending(sorted, positive_count, scratch);
        *count = positive_count;
    } else {
        int64_t untouched = 0, fresh = 0; /* untouched keys stay in order, the touched ones are re-keyed */
        for (int64_t k = 0; k < *count; ++k) {
            sorted[untouched] = sorted[k];
            untouched += !is_touched[n - 1 - (sorted[k] & mask)];
        }
        for (int64_t t = 0; t < num_touched; ++t) {
            const int64_t i = touched[t];
            scratch[fresh] = (value[i] << bits) | (n - 1 - i);
            fresh += value[i] > 0;
        }
        sort_descending(scratch, fresh, scratch + n);
        const int64_t k = merge_descending(sorted, untouched, scratch, fresh, order); /* into order, then copy back */
        memcpy(sorted, order, (size_t)k * sizeof(int64_t));
        *count = k;
    }
    for (int64_t k = 0; k < *count; ++k) order[k] = n - 1 - (sorted[k] & mask);
}

/* Reads sorted keys from a cache filled by an earlier full update_order: copies them into sorted and
 * writes their indices into order, as update_order would. */
static void copy_order(const int64_t *cached, int64_t count, int64_t n, int64_t *sorted, int64_t *order) {
    int bits = 0;
    while (((int64_t)1 << bits) < n) ++bits;
    const int64_t mask = ((int64_t)1 << bits) - 1;
    memcpy(sorted, cached, (size_t)count * sizeof(int64_t));
    for (int64_t k = 0; k < count; ++k) order[k] = n - 1 - (sorted[k] & mask);
}

/* Orders one line as update_order does. A candidate's first round (num_touched < 0) reads the line
 * from first_keys when an earlier candidate with the same threshold and receiver order sorted it
 * (*first_count >= 0), and otherwise sorts it and stores it there. */
static void order_line(const int64_t *value, int64_t n, const int64_t *touched, int64_t num_touched,
                       const unsigned char *is_touched, int64_t *sorted, int64_t *count, int64_t *order,
                       int64_t *scratch, int64_t *first_keys, int64_t *first_count) {
    if (num_touched < 0 && *first_count >= 0) {
        *count = *first_count;
        copy_order(first_keys, *count, n, sorted, order);
        return;
    }
    update_order(value, n, touched, num_touched, is_touched, sorted, count, order, scratch);
    if (num_touched < 0) {
        memcpy(first_keys, sorted, (size_t)*count * sizeof(int64_t));
        *first_count = *count;
    }
}

/* Returns a lower bound of every plan's max rank load (_load_floor in quota.py). A rank ends with at
 * most its masters' load plus its S slots filled with the S largest experts of other ranks (its
 * capacity). The k smallest capacities leave at least total minus their sum to the other R - k ranks.
 * Scratch: order [R * P], capacity [R], keys [2 * R * P] words. */
static int64_t load_floor(const int64_t *expert_load, const int64_t *master_rank_load, int64_t total, int64_t R,
                          int64_t P, int64_t S, int64_t *order, int64_t *capacity, int64_t *keys) {
    const int64_t E = R * P, K = min64(E, S + P); /* the S largest of other ranks are among the S + P largest */
    order_by_value(expert_load, E, order, keys);
    for (int64_t r = 0; r < R; ++r) {
        int64_t sum = 0, counted = 0;
        for (int64_t i = 0; i < K && counted < S; ++i) {
            if (order[i] / P == r) continue;
            sum += expert_load[order[i]];
            ++counted;
        }
        capacity[r] = master_rank_load[r] + sum;
    }
    order_by_value(capacity, R, order, keys); /* descending; walk it from the end */
    int64_t bound = 0, below = 0;
    for (int64_t k = 0; k < R; ++k) {
        const int64_t need = total - below, rest = R - k;
        if (need > 0) bound = max64(bound, floor_div(need + rest - 1, rest));
        below += capacity[order[R - 1 - k]];
    }
    return bound;
}

/* The time of a rank that hosts replicas, with the copies in the background (copy_overlap), in
 * assignments: "Copy cost" in quota.py. Nondecreasing in each of load, replica_load and sync. */
static int64_t replica_rank_time(int64_t load, int64_t replica_load, int64_t sync, int64_t copy_chunks,
                                 int64_t gemm_passes) {
    /* The forward in units of one assignment's forward GEMM, then the backward added. */
    const int64_t forward_sync = sync * gemm_passes;
    int64_t forward = max64(load, floor_div(forward_sync, copy_chunks) + replica_load);
    forward = max64(forward, forward_sync + floor_div(replica_load * (copy_chunks + 2), 3 * copy_chunks));
    return floor_div(load * (gemm_passes - 1) + forward, gemm_passes);
}

/* Whether slot s of rank r contains a replica that needs a copy: a filled slot whose expert is not
 * resident on r (resident_pos: [R * S] drain positions, -1 = none, or NULL for no resident replicas). */
static int copied(const int64_t *slot_pos, const int64_t *resident_pos, int64_t S, int64_t r, int64_t s) {
    const int64_t pos = slot_pos[r * S + s];
    if (pos < 0) return 0;
    if (resident_pos != NULL)
        for (int64_t k = 0; k < S; ++k)
            if (resident_pos[r * S + k] == pos) return 0;
    return 1;
}

/* Returns the slowest rank of one candidate with the weight sync counted, in assignments ("Copy cost"
 * in quota.py). slot_pos contains drain positions, so fan[] is indexed by drain position. Rank r's
 * masters are positions r * P .. r * P + P - 1 in either order. send_chunks: [R + 1], the relay
 * trees' link time of n copies in chunk times. resident_pos: [R * S] drain positions of the resident
 * replicas, -1 = none, or NULL; a replica of a resident expert needs no copy. fan: [R * P] scratch. */
static int64_t costed_peak(const int64_t *rank_load, const int64_t *master_quota, const int64_t *slot_pos, int64_t R,
                           int64_t P, int64_t S, int64_t copy_cost, int64_t copy_overlap, int64_t copy_chunks,
                           int64_t gemm_passes, const int64_t *send_chunks, int64_t relay_chunks,
                           const int64_t *resident_pos, int64_t *fan) {
    memset(fan, 0, (size_t)(R * P) * sizeof(int64_t));
    for (int64_t r = 0; r < R; ++r)
        for (int64_t s = 0; s < S; ++s)
            if (copied(slot_pos, resident_pos, S, r, s)) fan[slot_pos[r * S + s]] += 1;
    int64_t busiest = 0;
    for (int64_t r = 0; r < R; ++r) {
        int64_t in = 0, out = 0;
        for (int64_t s = 0; s < S; ++s) in += copied(slot_pos, resident_pos, S, r, s);
        for (int64_t p = 0; p < P; ++p) out += send_chunks[fan[r * P + p]];
        busiest = max64(busiest, max64(in * relay_chunks, out));
    }
    const int64_t sync = busiest * copy_cost / relay_chunks;
    int64_t peak = INT64_MIN;
    for (int64_t r = 0; r < R; ++r) {
        int64_t t = rank_load[r];
        if (copy_overlap) {
            int64_t in = 0, masters = 0;
            for (int64_t s = 0; s < S; ++s) in += copied(slot_pos, resident_pos, S, r, s);
            for (int64_t p = 0; p < P; ++p) masters += master_quota[r * P + p];
            if (in > 0) t = replica_rank_time(rank_load[r], rank_load[r] - masters, sync, copy_chunks, gemm_passes);
        }
        peak = max64(peak, t);
    }
    if (!copy_overlap) peak += sync;
    return min64(peak, COSTED_PEAK_LIMIT);
}

/* Kept out of line, so that the registers of the matching rounds stay as they are without a copy cost. */
#if defined(__GNUC__)
#define NOINLINE __attribute__((noinline))
#else
#define NOINLINE
#endif

/* One candidate's plan so far, as the early stop tracks it ("Stopping early" in quota_plan). */
struct stop_bound {
    int64_t *copies_of;    /* [E] replicas per master, by drain position */
    int64_t *copies_sent;  /* [R] chunk times each rank sends through relay trees */
    int64_t *replica_load; /* [R] quota of each rank's replicas */
    int64_t *copies_in;    /* [R] replicas each rank receives by copy (not resident) */
    int64_t busiest;       /* maximum chunk times one rank receives or sends */
    /* The three parts of replica_rank_time's numerator without the sync, maximised over the ranks
     * with replicas (the third one times 3 * copy_chunks, so that it stays an integer), and the
     * highest load among those ranks. */
    int64_t max_gemm, max_first_chunk, max_last_chunk, max_rank_load;
};

static void stop_bound_reset(struct stop_bound *b, int64_t R, int64_t E) {
    memset(b->copies_of, 0, (size_t)E * sizeof(int64_t));
    memset(b->copies_sent, 0, (size_t)R * sizeof(int64_t));
    memset(b->replica_load, 0, (size_t)R * sizeof(int64_t));
    memset(b->copies_in, 0, (size_t)R * sizeof(int64_t));
    b->busiest = b->max_gemm = b->max_first_chunk = b->max_last_chunk = b->max_rank_load = 0;
}

/* Adds one round's moves (receivers 0..num_active, the loads and slots after the round) and returns a
 * lower bound of the candidate's final costed peak if it exceeds beat, else -1.
 *
 * Without copy_overlap the bound is the highest load among the ranks with replicas plus the sync. With
 * it the bound is replica_rank_time maximised over the ranks that receive a copy, and the load over
 * the ranks whose replicas are all resident, which need no copy. With n = copy_chunks and
 * k = gemm_passes its numerator is the largest of load * k, load * (k - 1) + sync * k / n + replica
 * load and load * (k - 1) + sync * k + replica load * (n + 2) / (3 n), with the divisions rounded
 * down. Adding an integer commutes with rounding down, so the three parts' maxima without the sync
 * grow only on the round's receivers, and the test bound > beat needs no division: floor(x / d) >= y
 * exactly when x >= y * d. */
static NOINLINE int64_t stop_bound_update(struct stop_bound *b, int64_t num_active, const int64_t *recv_rank,
                                          const int64_t *amount, const int64_t *position, const int64_t *donor_rank,
                                          const int64_t *rank_load,
                                          const int64_t *slot_pos, const int64_t *slot_quota,
                                          int64_t S, int64_t copy_cost, int64_t copy_overlap, int64_t copy_chunks,
                                          int64_t gemm_passes, const int64_t *send_chunks, int64_t relay_chunks,
                                          const int64_t *resident_pos, int64_t beat) {
    /* The scalars live in locals here, since stores through the arrays could alias the struct's fields. */
    int64_t *copies_of = b->copies_of, *copies_sent = b->copies_sent;
    int64_t *replica_load = b->replica_load, *copies_in = b->copies_in;
    int64_t busiest = b->busiest, max_gemm = b->max_gemm, max_first_chunk = b->max_first_chunk;
    int64_t max_last_chunk = b->max_last_chunk, max_rank_load = b->max_rank_load;
    for (int64_t i = 0; i < num_active; ++i) {
        const int64_t recv = recv_rank[i], a = amount[i];
        if (a == 0) continue;
        /* Each receiver appears once per round, and its load is final for the round. The ranks with
         * replicas whose load changed are exactly these receivers, because such ranks never give load away. */
        replica_load[recv] += a;
        const int64_t load = rank_load[recv], backward = load * (gemm_passes - 1);
        max_rank_load = max64(max_rank_load, load);
        max_gemm = max64(max_gemm, load * gemm_passes);
        /* A slot whose quota is this round's amount is new, since quotas start at a positive amount. A
         * new replica of a resident expert needs no copy. */
        int64_t s = 0;
        while (slot_pos[recv * S + s] != position[i]) ++s;
        if (slot_quota[recv * S + s] == a && copied(slot_pos, resident_pos, S, recv, s)) {
            const int64_t n = ++copies_of[position[i]];
            copies_sent[donor_rank[i]] += send_chunks[n] - send_chunks[n - 1];
            copies_in[recv] += 1;
            busiest = max64(busiest, max64(copies_in[recv] * relay_chunks, copies_sent[donor_rank[i]]));
        }
        /* The replica terms bound a rank's time only once it receives a copy; before, its time is its load. */
        if (copies_in[recv] == 0) continue;
        max_first_chunk = max64(max_first_chunk, backward + replica_load[recv]);
        max_last_chunk = max64(max_last_chunk, backward * 3 * copy_chunks + replica_load[recv] * (copy_chunks + 2));
    }
    b->busiest = busiest;
    b->max_gemm = max_gemm;
    b->max_first_chunk = max_first_chunk;
    b->max_last_chunk = max_last_chunk;
    b->max_rank_load = max_rank_load;
    const int64_t sync = busiest * copy_cost / relay_chunks, forward_sync = sync * gemm_passes;
    if (!copy_overlap) return max_rank_load + sync > beat ? min64(max_rank_load + sync, COSTED_PEAK_LIMIT) : -1;
    const int64_t need = (beat + 1) * gemm_passes; /* bound > beat: numerator >= need */
    if (max_gemm < need && forward_sync < (need - max_first_chunk) * copy_chunks &&
        max_last_chunk < (need - forward_sync) * 3 * copy_chunks)
        return -1;
    const int64_t numerator = max64(max_gemm, max64(max_first_chunk + forward_sync / copy_chunks,
                                                    forward_sync + max_last_chunk / (3 * copy_chunks)));
    return min64(numerator / gemm_passes, COSTED_PEAK_LIMIT);
}

/* One round of best-fit receivers (_best_fit_round in quota.py). The bins are the donors' masters that
 * still hold quota, as keys quota << bits | position sorted descending; the keys at or above
 * spare << bits are a prefix, and its last one is the bin with the least quota that covers the spare,
 * lower position first on ties. With none, the receiver takes the first, fullest bin. A bin serves
 * its receivers in line order with whole spares while they fit. When the first one's spare does not
 * fit, it takes the whole bin. Writes position, donor_rank, offered and amount of the receivers in
 * line order and returns how many it matched. bins: [2 * R * P] scratch; bin_offered: [R * P] zeros,
 * left zero. */
static int64_t best_fit_round(const int64_t *master_quota, const int64_t *spare,
                              const int64_t *recv_rank, int64_t num_receivers, const int64_t *donor_order,
                              int64_t num_donors, int64_t P, int position_bits, int64_t min_quota, int64_t *bins,
                              int64_t *bin_offered, int64_t *position, int64_t *donor_rank, int64_t *offered,
                              int64_t *amount) {
    const int64_t mask = ((int64_t)1 << position_bits) - 1;
    int64_t num_bins = 0;
    for (int64_t d = 0; d < num_donors; ++d) {
        const int64_t r = donor_order[d];
        for (int64_t p = 0; p < P; ++p)
            if (master_quota[r * P + p] > 0) bins[num_bins++] = (master_quota[r * P + p] << position_bits) | (r * P + p);
    }
    if (num_bins == 0) return 0;
    sort_descending(bins, num_bins, bins + num_bins);
    for (int64_t i = 0; i < num_receivers; ++i) {
        const int64_t target = spare[recv_rank[i]] << position_bits;
        int64_t low = 0, high = num_bins; /* counts the keys >= target */
        while (low < high) {
            const int64_t mid = (low + high) / 2;
            if (bins[mid] >= target) low = mid + 1;
            else high = mid;
        }
        const int64_t key = bins[low > 0 ? low - 1 : 0], bin_quota = key >> position_bits;
        position[i] = key & mask;
        donor_rank[i] = position[i] / P;
        offered[i] = spare[recv_rank[i]];
        const int64_t before = bin_offered[position[i]];
        int64_t a = before == 0 ? min64(offered[i], bin_quota) : (before + offered[i] <= bin_quota ? offered[i] : 0);
        bin_offered[position[i]] = before + offered[i];
        amount[i] = a < min_quota ? 0 : a;
    }
    for (int64_t i = 0; i < num_receivers; ++i) bin_offered[position[i]] = 0;
    return num_receivers;
}

/*
 * loads:            [num_ranks * num_experts] int64, row-major load matrix, entries >= 0.
 * mean_steps:       [num_mean_steps] fixed-point fractions of the mean rank load.
 * gap_steps:        [num_gap_steps] fixed-point fractions of the gap to the unbalanced maximum.
 * anchors:          [num_anchors] receiver anchor points in quarters, or BY_MASTER_QUOTA.
 * best_fit_steps:   [num_best_fit_steps] fixed-point fractions of the mean rank load: the thresholds of
 *                   the best-fit receivers, which run after every other candidate.
 * num_drains:       1, or 2 to run every receiver family again, on the mean steps only, with donors
 *                   that shed over_drain_q (fixed point, of the mean rank load) beyond their excess.
 * copy_cost, copy_overlap, copy_chunks, gemm_passes, relay_chunks: QuotaConfig's copy model; copy_cost 0
 *                   compares plain peaks.
 * send_chunks:      [num_ranks + 1] relay_send_chunks(n, relay_chunks) for n = 0 .. num_ranks: the link time
 *                   of n copies of one expert through its relay tree, in chunk times; read with copy_cost > 0.
 * stop_at_target:   QuotaConfig.stop_at_target, 0 or 1.
 * num_rotations:    rotated receiver lines tried (0 for none): rotation j = 1 .. num_rotations moves the
 *                   first j receivers of the most-spare-first line to its end. Each runs on the best-fit
 *                   steps with each of the num_rotation_anchors rotation_anchors, after best fit.
 * resident:         [num_ranks * slots] logical expert whose current weights each redundant slot contains,
 *                   -1 = none, or NULL. Non-NULL adds the resident family and counts no copy for a
 *                   replica of a resident expert ("Resident replicas" in quota.py).
 * out_slot_expert:  [num_ranks * slots] logical expert per redundant slot, -1 = empty.
 * out_quota:        [num_ranks * (experts_per_rank + slots)] quota per physical slot.
 * Returns 0, or ERR_ARGS / ERR_MEMORY, or ERR_RESIDENT when a resident entry is not -1 or an expert
 * mastered on another rank, or ERR_VALUES when an entry is negative or an entry or the
 * total exceeds MAX_TOTAL_LOAD (nothing is written to the outputs then).
 */
static int quota_plan(const int64_t *loads, int64_t num_ranks, int64_t experts_per_rank, int64_t slots,
                      const int64_t *mean_steps, int64_t num_mean_steps, const int64_t *gap_steps, int64_t num_gap_steps,
                      const int64_t *anchors, int64_t num_anchors, const int64_t *best_fit_steps,
                      int64_t num_best_fit_steps, int64_t num_drains, int64_t over_drain_q, int64_t fraction_scale,
                      int64_t min_replica_quota, int64_t fraction_q, int64_t target_q, int64_t prefer_local,
                      int64_t num_rounds, int64_t copy_cost, int64_t copy_overlap, int64_t copy_chunks,
                      int64_t gemm_passes, int64_t relay_chunks, const int64_t *send_chunks, int64_t stop_at_target,
                      int64_t num_rotations, const int64_t *rotation_anchors, int64_t num_rotation_anchors,
                      const int64_t *resident, int64_t *out_slot_expert, int64_t *out_quota) {
    if (num_ranks < 1 || experts_per_rank < 1 || slots < 1 || num_rounds < 1 || num_anchors < 1 || num_drains < 1 ||
        over_drain_q < 0 || num_best_fit_steps < 0 ||
        num_mean_steps + num_gap_steps < 1 || fraction_scale < 1 || copy_cost < 0 || copy_chunks < 1 ||
        gemm_passes < 1 || relay_chunks < 1 || (copy_cost > 0 && send_chunks == NULL) ||
        (stop_at_target != 0 && stop_at_target != 1) || num_rotations < 0 ||
        (num_rotations > 0 && (num_rotation_anchors < 1 || rotation_anchors == NULL)))
        return ERR_ARGS;
    const int64_t R = num_ranks, P = experts_per_rank, S = slots, E = R * P;
    if (resident != NULL)
        for (int64_t i = 0; i < R * S; ++i)
            if (resident[i] < -1 || resident[i] >= E || (resident[i] >= 0 && resident[i] / P == i / S)) return ERR_RESIDENT;
    /* Candidate (o, a, t): receiver order o (most, then least spare first), anchor a, threshold t.
     * With a second drain, over-draining donors run (o, a, t) again for the mean steps t. Then the
     * best-fit receivers run on their own steps. */
    const int64_t T = num_mean_steps + num_gap_steps, RF = RECEIVER_ORDERS * num_anchors;
    const int64_t best_fit_start = T * RF + (num_drains > 1 ? num_mean_steps * RF : 0);
    /* The rotated receiver lines follow on the best-fit steps, one block of steps per (rotation, anchor).
     * With resident replicas, their family runs the ladder's T steps last. */
    const int64_t rotation_start = best_fit_start + num_best_fit_steps;
    const int64_t resident_start = rotation_start + num_rotations * num_rotation_anchors * num_best_fit_steps;
    const int64_t C = resident_start + (resident != NULL ? T : 0);
    /* First-round lines are cached per threshold step: the ladder's T steps, then the best-fit steps. */
    const int64_t TC = T + num_best_fit_steps;

    /* One allocation for everything: per-candidate final states plus per-round scratch. */
    const int64_t state_words = R + E + 2 * R * S; /* rank_load, master_quota (drain order), slot_pos, slot_quota */
    const int64_t words = 2 * E /* expert_load, drain_expert */ + R /* master rank load */ + C /* thresholds */ +
                          C * state_words + R /* slots_used */ + 10 * R /* round scratch */ + 2 * (R > P ? R : P) /* sort keys */ + 2 * E /* pieces */ +
                          3 * E /* own, segment tables */ + 4 * C /* metrics */ + E /* fan-out */ +
                          2 * E /* pieces by master quota */ + 3 * R /* sorted donor and receiver keys, touched ranks */ + E /* initial master quotas */ +
                          3 * TC * R + 3 * TC /* first-round lines per threshold and receiver order, their lengths */ +
                          E /* spares offered per best-fit bin */ + C /* plain peaks */ +
                          T /* first-drain steps by threshold */ + C /* stopped candidates */ +
                          E + 2 * R /* copies per master, chunk times sent and replica load per rank */ +
                          R * S /* resident replicas by drain position */ + R /* copies received per rank */;
    int64_t *mem = (int64_t *)malloc((size_t)words * sizeof(int64_t));
    if (mem == NULL) return ERR_MEMORY;
    int64_t *cursor = mem;
#define TAKE(name, n)        \
    int64_t *name = cursor; \
    cursor += (n)
    TAKE(expert_load, E);
    TAKE(drain_expert, E);
    TAKE(master_rank_load, R);
    TAKE(thresholds, C);
    TAKE(states, C * state_words);
    TAKE(slots_used, R);
    TAKE(excess, R);
    TAKE(spare, R);
    TAKE(order_key, R);
    TAKE(donor_order, R);
    TAKE(recv_rank, R);
    TAKE(keys, 2 * (R > P ? R : P));
    TAKE(offered, R);
    TAKE(segment, R);
    TAKE(position, R);
    TAKE(donor_rank, R);
    TAKE(amount, R);
    TAKE(piece_segment, E);
    TAKE(piece_end, E);
    TAKE(own, E);
    TAKE(segment_donor, E);
    TAKE(segment_local, E);
    TAKE(max_load, C);
    TAKE(num_replicas, C);
    TAKE(local, C);
    TAKE(skipped, C);
    TAKE(fan, E);
    TAKE(ranked, 2 * E);
    TAKE(donor_keys, R);
    TAKE(recv_keys, R);
    TAKE(touched, R);
    TAKE(initial_quota, E);
    TAKE(first_donor_keys, TC * R);
    TAKE(first_recv_keys, RECEIVER_ORDERS * TC * R);
    TAKE(first_counts, 3 * TC); /* donors per threshold, then receivers per order and threshold; -1 = not yet */
    TAKE(bin_offered, E);
    TAKE(plain_peak, C);
    TAKE(step_order, T);
    TAKE(stopped, C);
    TAKE(copies_of, E);
    TAKE(copies_sent, R);
    TAKE(replica_load, R);
    TAKE(resident_pos, R * S);
    TAKE(copies_in, R);
#undef TAKE
    for (int64_t i = 0; i < 3 * TC; ++i) first_counts[i] = -1;
    memset(bin_offered, 0, (size_t)E * sizeof(int64_t));
    unsigned char *is_touched = (unsigned char *)calloc((size_t)R, 1);
    if (is_touched == NULL) {
        free(mem);
        return ERR_MEMORY;
    }

    /* Step 1: expert and rank loads, thresholds, minimum replica quota. */
    /* The value checks run in the summing loop. The OR of all entries has a bit at or above MAX_LOAD_BITS only
     * if some entry is negative or at least MAX_TOTAL_LOAD. An OR vectorises on baseline x86-64 (SSE2),
     * where a 64-bit compare does not, so the exact check runs only when that bit is set. With every
     * entry at most MAX_TOTAL_LOAD, no sum below wraps while the matrix has under 2**28 entries. */
    memset(expert_load, 0, (size_t)E * sizeof(int64_t));
    uint64_t seen = 0;
    for (int64_t r = 0; r < R; ++r) {
        const int64_t *row = loads + r * E;
        for (int64_t e = 0; e < E; ++e) {
            expert_load[e] += row[e];
            seen |= (uint64_t)row[e];
        }
    }
    int out_of_range = 0;
    if (seen >> MAX_LOAD_BITS)
        for (int64_t i = 0; i < R * E; ++i) out_of_range |= (uint64_t)loads[i] > (uint64_t)MAX_TOTAL_LOAD;
    int64_t total = 0, top = INT64_MIN;
    for (int64_t r = 0; r < R && !out_of_range; ++r) {
        int64_t sum = 0;
        for (int64_t p = 0; p < P; ++p) sum += expert_load[r * P + p];
        master_rank_load[r] = sum;
        total += sum;
        out_of_range |= total > MAX_TOTAL_LOAD;
        if (sum > top) top = sum;
    }
    if (out_of_range) {
        free(is_touched);
        free(mem);
        return ERR_VALUES;
    }
    /* No replica pays for its copy. A rank that receives a copy has a costed load of at least copy_cost,
     * because its sync is at least one copy (costed_peak). So with copy_cost above the largest rank load,
     * every plan that copies a replica ends above the masters-only plan. When the masters-only plan also misses
     * the balance target, no plan meets it, and the search picks the masters-only plan, which its ladder
     * reaches at the step whose threshold is the largest rank load. Without a resident table every
     * replica is copied. This returns that plan without the search. */
    if (copy_cost > top && resident == NULL && mul_wrap(top, R * fraction_scale) > mul_wrap(total, target_q)) {
        for (int64_t r = 0; r < R; ++r) {
            for (int64_t p = 0; p < P; ++p) out_quota[r * (P + S) + p] = expert_load[r * P + p];
            for (int64_t s = 0; s < S; ++s) {
                out_slot_expert[r * S + s] = -1;
                out_quota[r * (P + S) + P + s] = 0;
            }
        }
        free(is_touched);
        free(mem);
        return 0;
    }
    /* piece_segment, excess and ranked serve as scratch here; the rounds overwrite them. */
    const int64_t floor_load = load_floor(expert_load, master_rank_load, total, R, P, S, piece_segment, excess, ranked);
    const int64_t gap = max64(top - floor_load, 0);
    for (int64_t t = 0; t < num_mean_steps; ++t)
        thresholds[t] = min64(floor_load + floor_div(mul_wrap(total, mean_steps[t]), R * fraction_scale), top);
    for (int64_t t = 0; t < num_gap_steps; ++t)
        thresholds[num_mean_steps + t] = min64(floor_load + floor_div(mul_wrap(gap, gap_steps[t]), fraction_scale), top);
    for (int64_t c = T; c < best_fit_start; ++c) thresholds[c] = thresholds[c < T * RF ? c % T : (c - T * RF) % num_mean_steps];
    for (int64_t t = 0; t < num_best_fit_steps; ++t)
        thresholds[best_fit_start + t] = min64(floor_load + floor_div(mul_wrap(total, best_fit_steps[t]), R * fraction_scale), top);
    for (int64_t c = rotation_start; c < resident_start; ++c)
        thresholds[c] = thresholds[best_fit_start + (c - rotation_start) % num_best_fit_steps];
    for (int64_t c = resident_start; c < C; ++c) thresholds[c] = thresholds[c - resident_start];
    const int64_t min_quota = max64(floor_div(mul_wrap(total, fraction_q), R * fraction_scale), min_replica_quota);
    const int64_t over_drain = floor_div(mul_wrap(total, over_drain_q), R * fraction_scale);

    for (int64_t r = 0; r < R; ++r) {
        for (int64_t p = 0; p < P; ++p) {
            segment_donor[r * P + p] = r;
            segment_local[r * P + p] = p;
        }
    }

    int position_bits = 0;
    while (((int64_t)1 << position_bits) < E) ++position_bits;
    const int64_t position_mask = ((int64_t)1 << position_bits) - 1;

    /* Drain order: hottest master first, lower local index first on ties. */
    for (int64_t r = 0; r < R; ++r) {
        order_by_value(expert_load + r * P, P, drain_expert + r * P, keys);
        for (int64_t p = 0; p < P; ++p) drain_expert[r * P + p] += r * P;
    }
    for (int64_t i = 0; i < E; ++i) initial_quota[i] = expert_load[drain_expert[i]];
    /* Resident replicas by drain position (fan serves as the inverse of drain_expert here). */
    /* Resident drain positions for the copy model, or NULL without a table. */
    const int64_t *resident_at = resident != NULL ? resident_pos : NULL;
    if (resident != NULL) {
        for (int64_t i = 0; i < E; ++i) fan[drain_expert[i]] = i;
        for (int64_t i = 0; i < R * S; ++i) resident_pos[i] = resident[i] >= 0 ? fan[resident[i]] : -1;
    }

    /* The first drain runs step by step in ascending order of threshold (lower step first on ties), every
     * family at one step before the next step. A step takes part while its threshold lies at or below the
     * balance target or at or below the lowest peak of the steps before it (best_load). The reference leaves
     * the first drain out of the choice from the first step that does neither, so those candidates are
     * not planned. With stop_at_target the first drain also ends after a step with a good plan. Then
     * the second drain, best fit and the rotated lines run, in candidate order. The reference also leaves those out at
     * thresholds at or above the lowest max rank load of the first drain's plans, and with
     * stop_at_target after a good first-drain plan, so they are not planned either. */
    for (int64_t t = 0; t < T; ++t) {
        int64_t at = t;
        for (; at > 0 && thresholds[step_order[at - 1]] > thresholds[t]; --at) step_order[at] = step_order[at - 1];
        step_order[at] = t;
    }
    const int64_t limit = mul_wrap(total, target_q);
    /* The highest peak at or below the balance target: peak * R * fraction_scale <= limit. */
    const int64_t good_peak = limit / (R * fraction_scale);
    /* Lowest peak of the candidates planned so far; during the first drain, of the steps before. */
    int64_t best_load = INT64_MAX, best_first_drain = INT64_MAX;
    /* Lowest plain peak of the first drain's candidates planned so far. */
    int64_t first_drain_low = INT64_MAX;
    int first_drain_good = 0; /* set with stop_at_target when a first-drain plan is good */
    struct stop_bound bound = {copies_of, copies_sent, replica_load, copies_in, 0, 0, 0, 0, 0};
    memset(skipped, 0, (size_t)C * sizeof(int64_t));
    memset(stopped, 0, (size_t)C * sizeof(int64_t));
    for (int64_t idx = 0; idx < C; ++idx) {
        const int64_t c = idx < T * RF ? (idx % RF) * T + step_order[idx / RF] : idx;
        const int64_t threshold = thresholds[c];
        const int found_good = stop_at_target && idx > 0 && mul_wrap(best_load, R * fraction_scale) <= limit;
        if (idx < T * RF && idx % RF == 0 && idx > 0 &&
            (found_good || (threshold > best_load && mul_wrap(threshold, R * fraction_scale) > limit))) {
            for (int64_t rest = idx; rest < T * RF; ++rest) skipped[(rest % RF) * T + step_order[rest / RF]] = 1;
            idx = T * RF - 1;
            continue;
        }
        if (idx == T * RF) {
            for (int64_t prev = 0; prev < T * RF; ++prev)
                if (!skipped[prev]) best_first_drain = min64(best_first_drain, plain_peak[prev]);
        }
        if (idx == T * RF) first_drain_good = found_good;
        /* The resident family takes part at the ladder steps where the first drain does; family 0's
         * candidate at step t is candidate t. */
        if (c >= resident_start ? skipped[c - resident_start]
                                : idx >= T * RF && (threshold >= best_first_drain || first_drain_good)) {
            skipped[c] = 1;
            continue;
        }
        /* The candidate's family and threshold index within its block, and the threshold's slot in the
         * first-round line cache. */
        const int best_fit = c >= best_fit_start && c < rotation_start;
        const int rotated = c >= rotation_start && c < resident_start;
        const int resident_family = c >= resident_start;
        int64_t family = c / T, step = c % T, rotation = 0, anchor = 0;
        if (rotated) {
            family = 0; /* most spare first without over-drain, as family 0, but with a rotation anchor */
            const int64_t block = (c - rotation_start) / num_best_fit_steps;
            step = (c - rotation_start) % num_best_fit_steps;
            rotation = block / num_rotation_anchors + 1;
            anchor = rotation_anchors[block % num_rotation_anchors];
        } else if (resident_family) {
            family = 0; /* after its resident rounds: the first anchor, most spare first, no over-drain */
            step = c - resident_start;
        } else if (best_fit) {
            family = 2 * RF;
            step = c - best_fit_start;
        } else if (c >= T * RF) {
            family = RF + (c - T * RF) / num_mean_steps;
            step = (c - T * RF) % num_mean_steps;
        }
        int64_t cache_step = step;
        if ((best_fit || rotated) && !(step < num_mean_steps && best_fit_steps[step] == mean_steps[step])) cache_step = T + step;
        if (!rotated) anchor = anchors[family % num_anchors];
        const int least_spare_first = family % RF >= num_anchors;
        const int64_t over = family >= RF && !best_fit && !resident_family ? over_drain : 0;
        int64_t *rank_load = states + c * state_words;
        int64_t *master_quota = rank_load + R;
        int64_t *slot_pos = master_quota + E;
        int64_t *slot_quota = slot_pos + R * S;
        /* A candidate with the threshold and anchor of an earlier one ends in the same state. */
        int64_t same = -1;
        for (int64_t prev = c - step; prev < c && same < 0; ++prev)
            if (thresholds[prev] == threshold) same = prev;
        /* Stopping early. A rank that hosts a replica never sheds load again, because it took at most its
         * spare and so never lies above the threshold. Its load and replica load only grow, and so do the
         * copies each rank receives and sends. The costed peak is nondecreasing in all of them. So the
         * costed peak of the plan so far, over the ranks that host replicas, bounds the final one from
         * below (stop_peak, from stop_bound_update). Their highest load bounds the final plain peak from
         * below too (stop_plain). Once stop_peak lies above both the lowest peak so far and the balance target,
         * the candidate can be neither the best nor good, and the rounds left would not change the
         * choice. A first-drain candidate also needs stop_plain at or above the lowest plain peak of the
         * first drain's candidates before it, which the second drain's thresholds are compared with.
         * A stopped candidate keeps the two bounds as its peaks. */
        int64_t stop_peak = 0, stop_plain = 0;
        if (same >= 0) {
            memcpy(rank_load, states + same * state_words, (size_t)state_words * sizeof(int64_t));
            stopped[c] = stopped[same];
            stop_peak = max_load[same];
            stop_plain = plain_peak[same];
        } else {
            memcpy(rank_load, master_rank_load, (size_t)R * sizeof(int64_t));
            memcpy(master_quota, initial_quota, (size_t)E * sizeof(int64_t));
            for (int64_t i = 0; i < R * S; ++i) {
                slot_pos[i] = -1;
                slot_quota[i] = 0;
            }
            memset(slots_used, 0, (size_t)R * sizeof(int64_t));
            /* Ranks whose load or slots changed in the last round; -1 before the first round. */
            int64_t num_touched = -1, num_donors = 0, num_receivers = 0;
            /* The candidate stops once its bound exceeds the lowest peak so far. That is tried only while no
             * plan so far is good, since a bound above a good peak is rare and the bookkeeping costs time. It
             * also needs the lowest peak below COSTED_PEAK_LIMIT, where peaks are clamped. */
            const int may_stop = copy_cost > 0 && best_load > good_peak && best_load < COSTED_PEAK_LIMIT;
            if (may_stop) stop_bound_reset(&bound, R, E);

            for (int64_t round = 0; round < num_rounds; ++round) {
                /* Step 2: donor pieces, hottest master first, largest donor first. Only the pieces of
                 * positive size are kept, each with its index on the reference's line of all
                 * num_experts pieces. That is exact because a search on that line never stops on a
                 * piece of size 0. */
                /* Excess, spare and receiver keys of every rank in the first round, then of the ranks that changed. */
                const int64_t num_changed = num_touched < 0 ? R : num_touched;
                for (int64_t t = 0; t < num_changed; ++t) {
                    const int64_t r = num_touched < 0 ? t : touched[t];
                    excess[r] = max64(rank_load[r] - threshold, 0);
                    spare[r] = slots_used[r] < S ? max64(threshold - rank_load[r], 0) : 0;
                    order_key[r] = least_spare_first && spare[r] > 0 ? total + 1 - spare[r] : spare[r];
                }
                /* The first round's lines depend only on the threshold (and the receiver order), so every
                 * family reuses the lines that the first candidate with this threshold sorted. */
                const int64_t order_slot = TC + (least_spare_first ? TC : 0) + cache_step;
                int64_t *first_donors = first_donor_keys + cache_step * R;
                int64_t *first_receivers = first_recv_keys + (order_slot - TC) * R;
                order_line(excess, R, touched, num_touched, is_touched, donor_keys, &num_donors, donor_order, keys, first_donors,
                           first_counts + cache_step);
                int64_t num_pieces = 0, end = 0;
                for (int64_t d = 0; d < num_donors; ++d) {
                    const int64_t *held = master_quota + donor_order[d] * P;
                    int64_t left = excess[donor_order[d]];
                    if (left > 0) left += over;
                    for (int64_t p = 0; p < P && left > 0; ++p) {
                        const int64_t piece = min64(left, held[p]);
                        if (piece > 0) {
                            end += piece;
                            piece_end[num_pieces] = end;
                            piece_segment[num_pieces] = d * P + p;
                            ++num_pieces;
                        }
                        left -= held[p];
                    }
                }
                /* By master quota: the pieces by their master's remaining quota, lower drain position
                 * first on ties, as keys quota << bits | (E - 1 - position). */
                if (anchor == BY_MASTER_QUOTA) {
                    for (int64_t k = 0; k < num_pieces; ++k) {
                        const int64_t drain_position = donor_order[segment_donor[piece_segment[k]]] * P + segment_local[piece_segment[k]];
                        ranked[k] = (master_quota[drain_position] << position_bits) | (E - 1 - drain_position);
                    }
                    sort_descending(ranked, num_pieces, ranked + E);
                }

                /* Step 3: receivers, most spare first, each at its anchor point (or, with
                 * BY_MASTER_QUOTA, the i-th receiver at the i-th ranked piece). Anchor points ascend, so
                 * the active receivers are a prefix and one pass over the pieces finds them all. The
                 * receivers after that prefix take nothing and change nothing. */
                order_line(order_key, R, touched, num_touched, is_touched, recv_keys, &num_receivers, recv_rank, keys,
                           first_receivers, first_counts + order_slot);
                if (rotated && num_receivers > 1) {
                    /* The first (rotation mod num_receivers) receivers with spare move behind the others.
                     * Three reversals rotate the line in place. */
                    const int64_t shift = rotation % num_receivers;
                    reverse(recv_rank, 0, shift);
                    reverse(recv_rank, shift, num_receivers);
                    reverse(recv_rank, 0, num_receivers);
                }
                for (int64_t t = 0; t < num_touched; ++t) is_touched[touched[t]] = 0;
                int64_t offered_end = 0, num_active = 0, k = 0;
                const int resident_round = resident_family && round < S;
                /* best_fit_round and the resident rounds match their receivers below. */
                for (int64_t i = 0; i < (best_fit || resident_round ? 0 : num_receivers); ++i) {
                    const int64_t recv_spare = spare[recv_rank[i]];
                    if (anchor == BY_MASTER_QUOTA) {
                        /* One piece per receiver, so each receiver is a group of its own. */
                        if (i >= num_pieces) break;
                        segment[i] = i;
                        position[i] = E - 1 - (ranked[i] & position_mask);
                        donor_rank[i] = position[i] / P;
                    } else {
                        const int64_t point = offered_end + (recv_spare * anchor) / 4;
                        offered_end += recv_spare;
                        while (k < num_pieces && piece_end[k] <= point) ++k;
                        if (k == num_pieces) break;
                        const int64_t seg = piece_segment[k];
                        segment[i] = seg;
                        donor_rank[i] = donor_order[segment_donor[seg]];
                        position[i] = donor_rank[i] * P + segment_local[seg];
                    }
                    offered[i] = recv_spare;
                    ++num_active;
                }

                /* Step 4: fill each receiver up to the threshold, capped by the master's remaining
                 * quota. Receivers served by one piece draw from it in line order. */
                int64_t before = 0, base = 0, moved = 0;
                if (best_fit) {
                    num_active = best_fit_round(master_quota, spare, recv_rank, num_receivers, donor_order, num_donors, P,
                                                position_bits, min_quota, ranked, bin_offered, position, donor_rank, offered, amount);
                    for (int64_t i = 0; i < num_active; ++i) moved |= amount[i] > 0;
                } else if (resident_round) {
                    /* Each receiver takes up to its spare from the expert in its round-th resident slot
                     * (_resident_round in quota.py) when that master's rank lies above the threshold. The
                     * receivers of one master draw on it in line order. */
                    for (int64_t i = 0; i < num_receivers; ++i) {
                        const int64_t recv = recv_rank[i], pos = resident_pos[recv * S + round];
                        const int active = pos >= 0 && spare[recv] > 0 && master_quota[pos] > 0 && rank_load[pos / P] > threshold;
                        position[i] = active ? pos : 0;
                        donor_rank[i] = position[i] / P;
                        offered[i] = active ? spare[recv] : 0;
                        const int64_t before = bin_offered[position[i]];
                        int64_t a = min64(offered[i], max64(master_quota[position[i]] - before, 0));
                        bin_offered[position[i]] = before + offered[i];
                        amount[i] = a < min_quota ? 0 : a;
                    }
                    for (int64_t i = 0; i < num_receivers; ++i) bin_offered[position[i]] = 0;
                    num_active = num_receivers;
                } else {
                    for (int64_t i = 0; i < num_active; ++i) {
                        if (i == 0 || segment[i] != segment[i - 1]) base = before;
                        int64_t a = min64(max64(master_quota[position[i]] - before + base, 0), offered[i]);
                        before += offered[i];
                        if (a < min_quota) a = 0;
                        amount[i] = a;
                        moved |= a > 0;
                    }
                }
                /* A resident round is followed by rounds that match differently, so it never ends the loop. */
                if (!moved && !resident_round) break;

                /* Step 5: write replicas. A receiver that already has a replica of the expert grows it. */
                for (int64_t i = 0; i < num_active; ++i) {
                    const int64_t recv = recv_rank[i], a = amount[i];
                    if (a == 0) continue;
                    int64_t slot_idx = -1;
                    for (int64_t s = 0; s < S; ++s) {
                        if (slot_pos[recv * S + s] == position[i]) {
                            slot_idx = s;
                            break;
                        }
                    }
                    if (slot_idx < 0) {
                        slot_idx = min64(slots_used[recv], S - 1);
                        slots_used[recv] += 1;
                    }
                    slot_pos[recv * S + slot_idx] = position[i];
                    slot_quota[recv * S + slot_idx] += a;
                }
                num_touched = 0;
                for (int64_t i = 0; i < num_active; ++i) {
                    master_quota[position[i]] -= amount[i];
                    rank_load[recv_rank[i]] += amount[i];
                    rank_load[donor_rank[i]] -= amount[i];
                    if (amount[i] == 0) continue;
                    const int64_t changed[2] = {recv_rank[i], donor_rank[i]};
                    for (int j = 0; j < 2; ++j) {
                        if (is_touched[changed[j]]) continue;
                        is_touched[changed[j]] = 1;
                        touched[num_touched++] = changed[j];
                    }
                }
                if (may_stop) {
                    const int64_t peak = stop_bound_update(&bound, num_active, recv_rank, amount, position, donor_rank,
                                                           rank_load, slot_pos, slot_quota, S, copy_cost,
                                                           copy_overlap, copy_chunks, gemm_passes, send_chunks,
                                                           relay_chunks, resident_at, best_load);
                    if (peak >= 0 && (idx >= T * RF || bound.max_rank_load >= first_drain_low)) {
                        stop_peak = peak;
                        stop_plain = bound.max_rank_load;
                        stopped[c] = 1;
                        break;
                    }
                }
            }
            for (int64_t t = 0; t < num_touched; ++t) is_touched[touched[t]] = 0;
        }
        if (stopped[c]) {
            plain_peak[c] = stop_plain;
            max_load[c] = stop_peak;
        } else {
            int64_t m = INT64_MIN;
            for (int64_t r = 0; r < R; ++r) m = max64(m, rank_load[r]);
            plain_peak[c] = m;
            max_load[c] = m;
            /* A costed peak is never below the plain one. So a candidate whose plain peak lies above both
             * the lowest peak so far and the balance target can be neither the best nor good. Its costed
             * peak is not computed, and its plain peak stays above the best and the target. */
            if (copy_cost > 0 && (m <= best_load || mul_wrap(m, R * fraction_scale) <= limit))
                max_load[c] = costed_peak(rank_load, master_quota, slot_pos, R, P, S, copy_cost, copy_overlap,
                                          copy_chunks, gemm_passes, send_chunks, relay_chunks,
                                          resident_at, fan);
        }
        best_load = min64(best_load, max_load[c]);
        if (idx < T * RF) first_drain_low = min64(first_drain_low, plain_peak[c]);
    }
    free(is_touched);

    /* Selection: lowest max load; among plans at or below the target, fewest replicas, then most
     * local assignments, then lowest max load, then the first index. */
    for (int64_t r = 0; r < R; ++r)
        for (int64_t p = 0; p < P; ++p) own[r * P + p] = loads[r * E + r * P + p];
    for (int64_t c = 0; c < C; ++c) {
        if (skipped[c] || stopped[c]) continue; /* a stopped candidate is never good, so its count is not read */
        const int64_t *slot_pos = states + c * state_words + R + E;
        /* Replicas that need a copy: with resident slots a plan that reuses them wins a tie. */
        int64_t n = 0;
        for (int64_t r = 0; r < R; ++r)
            for (int64_t s = 0; s < S; ++s) n += copied(slot_pos, resident_at, S, r, s);
        num_replicas[c] = n;
    }
    int64_t fewest = INT64_MAX;
    for (int64_t c = 0; c < C; ++c) {
        int good = !skipped[c] && (max_load[c] == best_load || mul_wrap(max_load[c], R * fraction_scale) <= limit);
        if (good) fewest = min64(fewest, num_replicas[c]);
        else num_replicas[c] = -1; /* marks "not good" below */
    }
    /* Local assignments decide only among the good plans with the fewest replicas. */
    int64_t max_local = -1;
    for (int64_t c = 0; c < C; ++c) {
        if (num_replicas[c] != fewest) continue;
        const int64_t *master_quota = states + c * state_words + R;
        const int64_t *slot_pos = master_quota + E;
        const int64_t *slot_quota = slot_pos + R * S;
        int64_t l = 0;
        if (prefer_local) {
            for (int64_t i = 0; i < E; ++i) l += min64(master_quota[i], own[drain_expert[i]]);
            for (int64_t r = 0; r < R; ++r) {
                for (int64_t s = 0; s < S; ++s) {
                    const int64_t pos = slot_pos[r * S + s];
                    if (pos >= 0) l += min64(slot_quota[r * S + s], loads[r * E + drain_expert[pos]]);
                }
            }
        }
        local[c] = l;
        max_local = max64(max_local, l);
    }
    int64_t lowest = INT64_MAX, best = 0;
    for (int64_t c = 0; c < C; ++c)
        if (num_replicas[c] == fewest && local[c] == max_local && max_load[c] < lowest) {
            lowest = max_load[c];
            best = c;
        }

    /* Output the chosen candidate with logical expert ids. */
    const int64_t *rank_load = states + best * state_words;
    const int64_t *master_quota = rank_load + R;
    const int64_t *slot_pos = master_quota + E;
    const int64_t *slot_quota = slot_pos + R * S;
    for (int64_t r = 0; r < R; ++r)
        for (int64_t p = 0; p < P; ++p) out_quota[r * (P + S) + (drain_expert[r * P + p] - r * P)] = master_quota[r * P + p];
    for (int64_t r = 0; r < R; ++r) {
        for (int64_t s = 0; s < S; ++s) {
            int64_t pos = slot_pos[r * S + s];
            out_slot_expert[r * S + s] = pos >= 0 ? drain_expert[pos] : -1;
            out_quota[r * (P + S) + P + s] = slot_quota[r * S + s];
        }
    }
    free(mem);
    return 0;
}

/* quota_plan without stop_at_target and without rotated receiver lines (both 0), with the arguments of
 * earlier builds since the relay-tree copy model (relay_chunks, send_chunks), so that
 * benchmarks/planner_ab.py can time this build against them. */
int ultraep_quota_plan(const int64_t *loads, int64_t num_ranks, int64_t experts_per_rank, int64_t slots,
                       const int64_t *mean_steps, int64_t num_mean_steps, const int64_t *gap_steps,
                       int64_t num_gap_steps, const int64_t *anchors, int64_t num_anchors,
                       const int64_t *best_fit_steps, int64_t num_best_fit_steps, int64_t num_drains,
                       int64_t over_drain_q, int64_t fraction_scale,
                       int64_t min_replica_quota, int64_t fraction_q, int64_t target_q, int64_t prefer_local,
                       int64_t num_rounds, int64_t copy_cost, int64_t copy_overlap, int64_t copy_chunks,
                       int64_t gemm_passes, int64_t relay_chunks, const int64_t *send_chunks, int64_t *out_slot_expert,
                       int64_t *out_quota) {
    return quota_plan(loads, num_ranks, experts_per_rank, slots, mean_steps, num_mean_steps, gap_steps, num_gap_steps,
                      anchors, num_anchors, best_fit_steps, num_best_fit_steps, num_drains, over_drain_q, fraction_scale,
                      min_replica_quota, fraction_q, target_q, prefer_local, num_rounds, copy_cost, copy_overlap,
                      copy_chunks, gemm_passes, relay_chunks, send_chunks, 0, 0, NULL, 0, NULL, out_slot_expert, out_quota);
}

/* quota_plan with its integer arguments in one array, in the same order: num_ranks,
 * experts_per_rank, slots, num_mean_steps, num_gap_steps, num_anchors, num_best_fit_steps, num_drains,
 * over_drain_q, fraction_scale, min_replica_quota, fraction_q, target_q, prefer_local, num_rounds,
 * copy_cost, copy_overlap, copy_chunks, gemm_passes, relay_chunks, stop_at_target, num_rotations,
 * num_rotation_anchors, then the num_rotation_anchors rotation anchors; then the arrays and resident
 * (NULL for none). A ctypes caller then converts 10 arguments instead of the 28 of ultraep_quota_plan,
 * which saves about 2 us per call. */
int ultraep_quota_plan_packed(const int64_t *loads, const int64_t *settings, const int64_t *mean_steps,
                              const int64_t *gap_steps, const int64_t *anchors, const int64_t *best_fit_steps,
                              const int64_t *send_chunks, const int64_t *resident, int64_t *out_slot_expert,
                              int64_t *out_quota) {
    const int64_t *s = settings;
    return quota_plan(loads, s[0], s[1], s[2], mean_steps, s[3], gap_steps, s[4], anchors, s[5], best_fit_steps, s[6],
                      s[7], s[8], s[9], s[10], s[11], s[12], s[13], s[14], s[15], s[16], s[17], s[18], s[19],
                      send_chunks, s[20], s[21], s + 23, s[22], resident, out_slot_expert, out_quota);
}
