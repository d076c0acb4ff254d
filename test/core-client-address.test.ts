import t from "tap";
import { clientKey } from "../core/index.js";

t.test("a client is counted by its IPv4 address, or by its IPv6 /64", async (t) => {
  t.equal(clientKey("192.0.2.7"), "192.0.2.7");
  t.equal(clientKey("::ffff:192.0.2.7"), "192.0.2.7", "an IPv4-mapped address is the IPv4 one");
  const key = "2001:db8:1:2::/64";
  for (const a of [
    "2001:db8:1:2:aaaa::1",
    "2001:db8:1:2::ffff",
    "2001:0db8:0001:0002:0:0:0:1",
    "2001:DB8:1:2:1:2:3:4",
  ]) {
    t.equal(clientKey(a), key, a);
  }
  t.equal(clientKey("2001:db8:1:3::1"), "2001:db8:1:3::/64", "the next /64 is another client");
  t.equal(clientKey("2001:db8::1"), "2001:db8:0:0::/64");
  t.equal(clientKey("::1"), "0:0:0:0::/64");
  t.equal(clientKey("fe80::1%eth0"), "fe80:0:0:0::/64", "a zone id is left out");
  t.equal(clientKey("64:ff9b::192.0.2.7"), "64:ff9b:0:0::/64", "an embedded IPv4 tail takes two groups");
  t.equal(clientKey("1:2:3::4:5:192.0.2.7"), "1:2:3:0::/64");
  t.equal(clientKey("not an address"), "not an address");
});
