// gale-client's TypeScript declarations (clients/js/gale-client.d.ts) checked by `tsc` against
// an application's use of the API (tests/types/usage.ts), whose `@ts-expect-error` lines must
// fail: declarations that drifted from the library, or fell back to `any`, fail this test.
//
// Run: node --test tests/node/types.test.mjs

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { it } from 'node:test';

import { REPO_ROOT } from '../lib/gale-process.mjs';

it('the type declarations match the API an application uses', () => {
  const tsc = join(REPO_ROOT, 'tests', 'node_modules', '.bin', 'tsc');
  const run = spawnSync(tsc, ['-p', join(REPO_ROOT, 'tests', 'types', 'tsconfig.json')], { encoding: 'utf8', timeout: 60_000 });
  assert.equal(run.error, undefined, `tsc did not run: ${run.error}`);
  assert.equal(run.status, 0, `tsc found errors:\n${run.stdout}${run.stderr}`);
});
