/**
 * `work`'s value, or undefined once `ms` have passed, whichever comes first
 * (a failure of `work` in time rejects). Work left behind goes on by itself;
 * its later failure is nobody's concern.
 */
export function within<T>(work: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<undefined>((resolve) => {
    timer = setTimeout(resolve, ms, undefined);
  });
  work.catch(() => {});
  return Promise.race([work, late]).finally(() => clearTimeout(timer));
}
