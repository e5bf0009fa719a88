// Validate Prometheus Operator custom resources (JSON array on stdin) against the schemas that
// @kubernetes-models/prometheus-operator generates from the operator's API types.
// Prints one line per resource; exits 1 if any is invalid or has no schema.
import { readFileSync } from "node:fs";

const PACKAGE = "@kubernetes-models/prometheus-operator";
let failed = false;
for (const doc of JSON.parse(readFileSync(0, "utf8"))) {
  const [group, version] = doc.apiVersion.split("/");
  const what = `${doc.kind}/${doc.metadata?.name} (${doc.apiVersion})`;
  let model;
  try {
    model = (await import(`${PACKAGE}/${group}/${version}/${doc.kind}`))[doc.kind];
  } catch {
    console.log(`ERROR ${what}: ${PACKAGE} has no schema for it`);
    failed = true;
    continue;
  }
  try {
    new model(doc).validate();
    console.log(`OK ${what}`);
  } catch (error) {
    console.log(`ERROR ${what}: ${error.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
