import { BACKDATE_MS } from "./profiles.js";

/**
 * When a certificate valid from `notBefore` to `notAfter` should be renewed:
 * `renewBeforeMs` ahead of its expiry (PKI.RenewBefore), but never before two
 * thirds of its real lifetime has passed, so a certificate shorter-lived than
 * RenewBefore (a 20 s test TTL, or a short one from another CA) is not renewed
 * in a loop. The PKI backdates notBefore by BACKDATE_MS for clock skew; that
 * margin is not lifetime.
 */
export function certificateRenewalTime(notBefore: Date, notAfter: Date, renewBeforeMs: number): Date {
  const end = notAfter.getTime();
  const issued = Math.min(notBefore.getTime() + BACKDATE_MS, end);
  const lifetime = end - issued;
  return new Date(end - Math.max(0, Math.min(renewBeforeMs, lifetime / 3)));
}
