#!/bin/bash
B=/work/main/target/release/tern-bench
R=/tmp/results3
cd /tmp
rm -f $R/direct.jsonl
for run in 1 2 3 4 5; do $B direct --json --report $R/report-direct 2>>$R/campaign.log | tail -1 >> $R/direct.jsonl; done
for run in 1 2 3; do $B direct --in-flight 32 --json 2>>$R/campaign.log | tail -1 >> $R/direct-inflight32.jsonl; done
for run in 1 2 3; do
  $B hol --json --report $R/report-hol 2>>$R/campaign.log | tail -1 >> $R/hol.jsonl
  $B hol --same-recipient --json 2>>$R/campaign.log | tail -1 >> $R/hol-same-recipient.jsonl
  $B group --json --report $R/report-group 2>>$R/campaign.log | tail -1 >> $R/group.jsonl
  $B offline-sync --json 2>>$R/campaign.log | tail -1 >> $R/offline-sync.jsonl
  $B migration --json --report $R/report-migration 2>>$R/campaign.log | tail -1 >> $R/migration.jsonl
  $B soak --json --report $R/report-soak 2>>$R/campaign.log | tail -1 >> $R/soak.jsonl
done
echo done > $R/campaign.done
