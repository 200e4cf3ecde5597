module tenx/loadgen

go 1.22
