/*
 * Floating-point recurrences kept in vector registers (ymm with -mavx2, xmm pairs with
 * -msse4.2) and on the x87 stack, under a non-default rounding mode (MXCSR and the x87
 * control word both say "upward"), across the dump.
 *
 *   fpavx OUTER INNER EVERY GATE
 *
 * 16 lanes of the logistic map x = r x (1 - x) (chaotic: one wrong bit anywhere and every
 * later digit differs) and an x87 long double recurrence run INNER steps per outer step with
 * no memory traffic and no calls. Every EVERY outer steps the lanes' bits are hashed and
 * printed as "iter K hash H"; at the end "done H". GATE >= 0: before outer step GATE the
 * target spins (in user mode, state still in registers) until SIGUSR2.
 */
#include "rs.h"
#include <fenv.h>

typedef double v4d __attribute__((vector_size(32)));

static uint64_t bits(double d)
{
	uint64_t u;
	memcpy(&u, &d, sizeof(u));
	return u;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: fpavx OUTER INNER EVERY GATE\n");
		return 2;
	}
	long outer = atol(argv[1]), inner = atol(argv[2]), every = atol(argv[3]), gate = atol(argv[4]);
	rs_init();
	fesetround(FE_UPWARD);
	v4d a = {0.11, 0.12, 0.13, 0.14}, b = {0.21, 0.22, 0.23, 0.24};
	v4d c = {0.31, 0.32, 0.33, 0.34}, d = {0.41, 0.42, 0.43, 0.44};
	const v4d r = {3.99, 3.98, 3.97, 3.96}, one = {1.0, 1.0, 1.0, 1.0};
	long double z = 1.0L / 3.0L;
	uint64_t h = 0;
	for (long k = 0; k < outer; k++) {
		while (k == gate && !rs_go)
			__builtin_ia32_pause();
		for (long i = 0; i < inner; i++) {
			a = r * a * (one - a);
			b = r * b * (one - b);
			c = r * c * (one - c);
			d = r * d * (one - d);
			z = z * 1.0000001L + 0.3L / z;
		}
		if ((k + 1) % every == 0) {
			v4d all[4] = {a, b, c, d};
			for (int j = 0; j < 4; j++)
				for (int l = 0; l < 4; l++)
					h = rs_mix(h, bits(all[j][l]));
			long double zz = z;
			uint64_t zb[2] = {0, 0};
			memcpy(zb, &zz, 10);
			h = rs_mix(rs_mix(h, zb[0]), zb[1]);
			printf("iter %ld hash %016llx\n", k + 1, (unsigned long long)h);
		}
	}
	printf("done %016llx\n", (unsigned long long)h);
	return 0;
}
